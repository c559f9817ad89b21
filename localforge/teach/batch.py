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
from localforge.resumable import ResumableOutput, check_free, check_output
from localforge.teach.settings import Role, TeacherSettings


class ItemFailed(Exception):
    """One item could not be improved: ``stage`` (draft, critique, verify, rewrite) and the reason."""

    def __init__(self, stage: str, who: str, error: BaseException, history: list[dict]):
        from localforge.backends.types import first_line

        self.stage, self.error, self.history = stage, error, history
        super().__init__(f"{stage}: {who}: {' '.join(first_line(error).split())[:300]}")


class Models:
    """The teacher and the student as loaded backends (one backend when both are the same model),
    with a lock for each model that runs in-process (one call at a time)."""

    def __init__(self, settings: TeacherSettings, teacher=None, student=None):
        from localforge.backends import get_backend

        self._own: list[Any] = []
        cache = settings.cache or None

        def build(role: Role):
            backend = get_backend(role.backend, role.model, cache=cache, **role.backend_options())
            self._own.append(backend)
            return backend

        wanted = settings.student if "student" in settings.ROLES else None  # a verb may have no student
        try:
            self.teacher = teacher or build(settings.teacher)
            if student is not None or wanted is None:
                self.student = student
            elif teacher is None and wanted.key() == settings.teacher.key():
                self.student = self.teacher
            else:
                self.student = build(wanted)
        except BaseException:
            self.close()
            raise
        self._locks = {id(b): threading.Lock() if b.capabilities.parallel <= 1 else contextlib.nullcontext()
                       for b in (self.teacher, self.student) if b is not None}

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


class Calls:
    """Calls to the models for one item, each failure an ``ItemFailed`` naming the stage and who;
    ``history`` is what the item did so far (kept with a failure)."""

    def __init__(self, models: Models, settings: TeacherSettings):
        self.models, self.settings = models, settings
        self.history: list[dict] = []

    def params(self, max_tokens: int):
        from localforge.backends import GenerationParams

        return GenerationParams(max_tokens=max_tokens, temperature=self.settings.temperature, seed=self.settings.seed)

    def call(self, stage: str, backend, call: Callable[[], Any]) -> Any:
        from localforge.backends import BackendError

        try:
            with self.models.using(backend):
                return call()
        except BackendError as exc:
            raise ItemFailed(stage, self.models.who(backend), exc, self.history) from exc

    def text(self, stage: str, backend, conv: list[dict], max_tokens: int, required: bool = False):
        """``(text, completion tokens)``; with ``required``, an empty answer fails the item."""
        result = self.call(stage, backend, lambda: backend.chat(conv, self.params(max_tokens)))
        answer = result.text.strip()
        if required and not answer:
            from localforge.backends import InvalidResponse

            raise ItemFailed(stage, self.models.who(backend), InvalidResponse("answered nothing"), self.history)
        return answer, result.completion_tokens

    def json(self, stage: str, conv: list[dict], schema: dict, max_tokens: int | None = None,
             check: Callable[[Any], None] | None = None) -> dict:
        """The teacher's structured answer (``generate_json``: the ladder, re-asks, ``check``)."""
        from localforge.backends import generate_json

        teacher = self.models.teacher
        params = self.params(max_tokens or self.settings.critique_tokens)
        return self.call(stage, teacher, lambda: generate_json(
            teacher, conv, schema, params, attempts=self.settings.attempts, check=check))


# --- the input -----------------------------------------------------------------------------------


def read_jsonl(path: Path, check: Callable[[Any, str], None], noun: str, field: str,
               name: str | None = None, limit: int | None = None,
               cut_last: bool = False) -> list[tuple[int, dict, str]]:
    """The rows of a JSONL file of ``noun`` as (line, row, key), each checked by ``check(row, where)``
    before any output exists: a bad line is a one-line error naming the file and line. Blank lines
    are skipped; ``limit`` takes the first rows; with ``cut_last``, a last line that does not parse
    and has no newline (a writer killed mid-line: the output of a stopped run) is left out. A row's
    key is its content hash and which copy of that content it is, so it stays the same when lines move."""
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
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if cut_last and n == len(lines) and not text.endswith("\n"):
                break
            raise ConfigError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        check(row, where)
        digest = hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
        seen[digest] = seen.get(digest, -1) + 1
        rows.append((n, row, f"{digest}-{seen[digest]}"))
    if not rows:
        raise ConfigError(f"{path}: no {noun}: give one JSON object per line, each with \"{field}\"")
    return rows


def check_out(input: str | Path, out: str | Path, job: str, noun: str = "items") -> None:
    """``-o`` can be written, is not the input, and no other run holds it: one-line errors, no files made."""
    check_output(out, noun=noun)
    if Path(out).resolve() == Path(input).resolve():
        raise UsageError(f"-o {out}: that is the input file; give another file for the {noun}")
    check_free(Path(out), job)


# --- the batch -----------------------------------------------------------------------------------


def done_key(row: dict):
    """A progress line's (item key, settings digest)."""
    return (row["item"], str(row.get("settings"))) if isinstance(row.get("item"), str) else None


def row_key(row: dict):
    """An output or rejects row's (item key, settings digest)."""
    return row["_provenance"]["item"], row["_provenance"]["settings"]


def run_batch(items: list, input: Path, out: Path, settings: TeacherSettings, models: Models,
              work: Callable[[Any], dict], *, job: str, summary, phash: str,
              label: Callable[[Any], dict], progress: Callable[[dict], dict],
              tally: Callable[[Any, dict], None], on_event: Callable[..., None] | None = None,
              rows: Callable[[Any, dict], list[dict]] | None = None):
    """Run ``work(item)`` on every item not yet done in ``out`` and return ``summary`` filled in.

    Each item has ``key``, ``line`` and ``row``; ``label(item)`` gives its own fields for a rejects
    row, ``progress(result)`` the fields of its progress line and ``item`` event, ``tally`` counts a
    done item into ``summary`` (which has items, done, skipped, failed, concurrency, seconds).
    A done item writes ``rows(item, result)`` (default: one row, the input row with the result's
    keys), each with ``_provenance``.
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
                        "teacher": models.describe(models.teacher),
                        **({"student": models.describe(models.student)} if models.student is not None else {}),
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
                for row in rows(item, result) if rows else [{**item.row, **result}]:
                    output.write(output.out, {**row, "_provenance": provenance(item)})
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
