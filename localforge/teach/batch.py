"""What every teach job shares: the teacher and the student as loaded backends, an item that
failed, and the batch runner (resumable output through ``localforge.resumable``, items in parallel
when the teacher is a server, failed items to the rejects file with their stage and reason)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

from localforge.errors import ConfigError, UsageError
from localforge.resumable import ResumableOutput
from localforge.teach.settings import Role, TeachSettings


class ItemFailed(Exception):
    """One item could not be improved: ``stage`` (draft, critique, verify, rewrite) and the reason."""

    def __init__(self, stage: str, who: str, error: BaseException, history: list[dict]):
        from localforge.backends.types import first_line

        self.stage, self.error, self.history = stage, error, history
        super().__init__(f"{stage}: {who}: {' '.join(first_line(error).split())[:300]}")


class Models:
    """The teacher and the student as loaded backends (one backend when both are the same model),
    with a lock for each model that runs in-process (one call at a time)."""

    def __init__(self, settings: TeachSettings, teacher=None, student=None):
        from localforge.backends import get_backend

        self._own: list[Any] = []
        cache = settings.cache or None

        def build(role: Role):
            backend = get_backend(role.backend, role.model, cache=cache, **role.backend_options())
            self._own.append(backend)
            return backend

        try:
            self.teacher = teacher or build(settings.teacher)
            if student is not None:
                self.student = student
            elif teacher is None and settings.student.key() == settings.teacher.key():
                self.student = self.teacher
            else:
                self.student = build(settings.student)
        except BaseException:
            self.close()
            raise
        self._locks = {id(b): threading.Lock() if b.capabilities.parallel <= 1 else contextlib.nullcontext()
                       for b in (self.teacher, self.student)}

    @property
    def parallel(self) -> int:
        return max(1, self.teacher.capabilities.parallel)

    def using(self, backend):
        return self._locks[id(backend)]

    @staticmethod
    def describe(backend) -> dict:
        return {"backend": backend.name, "model": backend.model_name or backend.model_ref}

    def who(self, backend) -> str:
        role = "teacher" if backend is self.teacher else "student"
        where = getattr(backend, "base_url", None)
        return f"{role} ({backend.name} {backend.model_name or backend.model_ref}{' at ' + where if where else ''})"

    def close(self) -> None:
        for backend in self._own:
            backend.close()
        self._own = []


# --- the input -----------------------------------------------------------------------------------


def read_jsonl(path: Path, check: Callable[[Any, str], None], noun: str, field: str,
               name: str | None = None, limit: int | None = None) -> list[tuple[int, dict, str]]:
    """The rows of a JSONL file of ``noun`` as (line, row, key), each checked by ``check(row, where)``
    before any output exists: a bad line is a one-line error naming the file and line. Blank lines
    are skipped; ``limit`` takes the first rows. A row's key is its content hash and which copy of
    that content it is, so it stays the same when lines move."""
    name = name or str(path)
    if not path.exists():
        raise UsageError(f"{name}: no such file")
    if path.is_dir():
        raise UsageError(f"{name}: a folder; give a JSONL file of {noun}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8 JSONL") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    rows: list[tuple[int, dict, str]] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        check(row, where)
        digest = hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
        seen[digest] = seen.get(digest, -1) + 1
        rows.append((n, row, f"{digest}-{seen[digest]}"))
    if not rows:
        raise ConfigError(f"{path}: no {noun}: give one JSON object per line, each with \"{field}\"")
    return rows


# --- the batch -----------------------------------------------------------------------------------


def done_key(row: dict):
    """A progress line's (item key, settings digest)."""
    return (row["item"], str(row.get("settings"))) if isinstance(row.get("item"), str) else None


def row_key(row: dict):
    """An output or rejects row's (item key, settings digest)."""
    return row["_provenance"]["item"], row["_provenance"]["settings"]


def run_batch(items: list, input: Path, out: Path, settings: TeachSettings, models: Models,
              work: Callable[[Any], dict], *, job: str, summary, phash: str,
              label: Callable[[Any], dict], progress: Callable[[dict], dict],
              tally: Callable[[Any, dict], None], on_event: Callable[..., None] | None = None):
    """Run ``work(item)`` on every item not yet done in ``out`` and return ``summary`` filled in.

    Each item has ``key``, ``line`` and ``row``; ``label(item)`` gives its own fields for a rejects
    row, ``progress(result)`` the fields of its progress line and ``item`` event, ``tally`` counts a
    done item into ``summary`` (which has items, done, skipped, failed, concurrency, seconds).
    ``models`` is closed at the end. Events: ``start`` (total, skipped, concurrency), then ``item``
    with status done or failed."""
    emit = on_event or (lambda kind, **data: None)
    t0 = time.perf_counter()
    digest = settings.digest()
    try:
        with ResumableOutput(out, done_key=done_key, row_key=row_key, job=job) as output:
            todo = [it for it in items if (it.key, digest) not in output.done]
            summary.skipped = len(items) - len(todo)
            summary.concurrency = min(settings.concurrency or models.parallel, max(len(todo), 1))
            emit("start", total=len(items), skipped=summary.skipped, concurrency=summary.concurrency)

            def provenance(item) -> dict:
                return {"source": str(input), "line": item.line, "item": item.key, "settings": digest,
                        "teacher": models.describe(models.teacher), "student": models.describe(models.student),
                        "prompt_hash": phash, "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

            def one(item):
                try:
                    return item, work(item), None
                except ItemFailed as exc:
                    return item, None, exc

            def record(item, result: dict | None, error: ItemFailed | None) -> None:
                if error is not None:
                    attempts = [asdict(a) for a in getattr(error.error, "attempts", [])]
                    output.write(output.rejects, {
                        "line": item.line, **label(item), "stage": error.stage, "error": str(error),
                        "attempts": attempts, "history": error.history, "_provenance": provenance(item)})
                    output.sync()  # not finished: a re-run tries it again (and drops this row)
                    summary.failed.append((item.line, str(error)))
                    emit("item", status="failed", line=item.line, reason=str(error))
                    return
                output.write(output.out, {**item.row, **result, "_provenance": provenance(item)})
                output.finish({"item": item.key, "settings": digest, "line": item.line, **progress(result)})
                summary.done += 1
                tally(summary, result)
                emit("item", status="done", line=item.line, **progress(result))

            if summary.concurrency <= 1:
                for item in todo:
                    record(*one(item))
            else:
                pool = ThreadPoolExecutor(max_workers=summary.concurrency)
                try:
                    for future in as_completed([pool.submit(one, item) for item in todo]):
                        record(*future.result())
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
    finally:
        models.close()
    summary.failed.sort()  # input order, whatever order parallel items finished in
    summary.seconds = time.perf_counter() - t0
    return summary
