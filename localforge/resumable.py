"""Resumable JSONL output, shared by the jobs that write rows as they make them (extract, teach).

A job writes ``OUT.jsonl`` item by item. Beside it:

```
OUT.progress.jsonl   one line per finished item (its key and the settings digest): a re-run skips it
OUT.rejects.jsonl    what failed, with the reason
OUT.lock             an OS lock held while a run writes: a second run on the same output is refused
```

When an item is finished, the rows written for it are fsynced before its progress line is written
(and fsynced). Opening the output again first drops every row of ``OUT.jsonl`` and
``OUT.rejects.jsonl`` whose item is not in the progress file, and any line cut short by a crash,
so a kill -9 at any point loses nothing finished and duplicates nothing.

A job says what an item's key is: ``done_key(progress_row)`` and ``row_key(row)`` (the same key
read from a row of the output or the rejects). Core: imports filelock and the standard library.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

from localforge.errors import LocalforgeError, UsageError
from localforge.files import write_atomic


class OutputBusy(LocalforgeError):
    """Another run holds the lock on the same output."""


def _stem(out: Path) -> str:
    return out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name


def sidecar(out: Path, kind: str) -> Path:
    """``out.jsonl`` -> ``out.progress.jsonl`` / ``out.rejects.jsonl``."""
    out = Path(out)
    return out.with_name(f"{_stem(out)}.{kind}.jsonl")


def lock_path(out: Path) -> Path:
    """``out.jsonl`` -> ``out.lock``: held (an OS lock) while a run writes ``out``."""
    out = Path(out)
    return out.with_name(f"{_stem(out)}.lock")


def output_files(out: Path) -> list[Path]:
    """The files a run on ``out`` writes (the lock among them)."""
    out = Path(out)
    return [out, sidecar(out, "progress"), sidecar(out, "rejects"), lock_path(out)]


def check_output(out: str | Path, noun: str = "records") -> None:
    """``-o`` must name a file that can be written (its folder may be missing: it is created):
    a one-line ``UsageError`` naming the path otherwise, before any work or any file is made."""
    given, out = str(out), Path(out)
    if not given.strip() or given.endswith(("/", os.sep)) or out.name in ("", ".", ".."):
        raise UsageError(f"-o {out}: give a file name for the {noun}, e.g. {out / (noun + '.jsonl')}")
    for path in output_files(out):
        if path.is_dir():
            raise UsageError(f"-o {out}: {path} is a folder; give a file name, e.g. {path / (noun + '.jsonl')}")
        if path.exists() and not os.access(path, os.W_OK):
            raise UsageError(f"-o {out}: {path} is not writable")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"-o {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"-o {out}: cannot write in {parent} (permission denied)")


def output_error(out: Path, exc: OSError) -> UsageError:
    """An OSError met while opening or writing the output, as one line naming ``-o``."""
    reason = exc.strerror or type(exc).__name__
    return UsageError(f"-o {out}: cannot write {exc.filename or out}: {reason[:1].lower() + reason[1:]}")


def _busy(out: Path, job: str) -> OutputBusy:
    return OutputBusy(f"-o {out}: another {job} run is writing it ({lock_path(out)} is locked); "
                      "wait for it to finish or give another -o")


def _open_lock(out: Path) -> None:
    """Open (or create) the lock file once: filelock would read a file it cannot open as a lock
    held by someone else; this raises the real OSError instead."""
    os.close(os.open(lock_path(out), os.O_RDWR | os.O_CREAT, 0o644))


def check_free(out: Path, job: str = "extract") -> None:
    """Refuse at once when another run holds ``out`` (its lock file exists only once a run began)."""
    from filelock import FileLock, Timeout

    out = Path(out)
    if lock_path(out).is_file():
        try:
            _open_lock(out)
            FileLock(lock_path(out), timeout=0).acquire().lock.release()
        except Timeout:
            raise _busy(out, job) from None
        except OSError as exc:
            raise output_error(out, exc) from None


def read_rows(path: Path) -> Iterator[Any]:
    """The JSON values of a JSONL file, skipping lines that do not parse (cut short by a crash)."""
    if not Path(path).is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def keep_only(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite ``path`` with only the complete lines whose row ``keep`` accepts (atomically);
    a no-op when nothing is dropped."""
    if not path.is_file():
        return
    raw = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = []
    for line in raw:
        try:
            if line.endswith("\n") and keep(json.loads(line)):
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            pass
    if len(kept) != len(raw):
        write_atomic(path, "".join(kept))


class ResumableOutput:
    """The output files of a run, and which items they hold completely. Holds an OS lock on
    ``out.lock`` while open: a second run on the same output is refused, not interleaved.

    ``done_key(progress_row)`` is a finished item's key (None: not a progress row);
    ``row_key(row)`` the key of the item a row of the output or the rejects belongs to.
    """

    def __init__(self, out: Path, done_key: Callable[[dict], Hashable | None],
                 row_key: Callable[[dict], Hashable], job: str = "extract"):
        from filelock import FileLock, Timeout

        self.out = out = Path(out)
        self.progress = sidecar(out, "progress")
        self.rejects = sidecar(out, "rejects")
        self.done: set[Hashable] = set()
        self._done_key, self._files, self._lock = done_key, {}, None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _open_lock(out)
            lock = FileLock(lock_path(out), timeout=0)
            try:
                lock.acquire()
                self._lock = lock
            except Timeout:
                raise _busy(out, job) from None
        except OSError as exc:
            raise output_error(out, exc) from None
        try:
            for row in read_rows(self.progress):
                key = done_key(row) if isinstance(row, dict) else None
                if key is not None:
                    self.done.add(key)
            keep_only(self.progress, lambda row: done_key(row) is not None)  # a half-written line
            for path in (self.out, self.rejects):
                keep_only(path, lambda row: row_key(row) in self.done)
            for p in (self.out, self.rejects, self.progress):
                self._files[p] = open(p, "a", encoding="utf-8")
        except OSError as exc:
            self.close()
            raise output_error(out, exc) from None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ResumableOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, which: Path, row: dict) -> None:
        """One row to ``which`` (``self.out`` or ``self.rejects``), flushed (not yet synced)."""
        fh = self._files[which]
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()

    def sync(self) -> None:
        """What was written to the output and the rejects is on disk."""
        for which in (self.out, self.rejects):
            os.fsync(self._files[which].fileno())

    def finish(self, entry: dict) -> None:
        """Mark an item finished: its rows synced, then ``entry`` (with a timestamp) in the progress file."""
        self.sync()
        self.write(self.progress, {**entry, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        os.fsync(self._files[self.progress].fileno())
        self.done.add(self._done_key(entry))

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files = {}
        if self._lock is not None:
            self._lock.release()
            self._lock = None
