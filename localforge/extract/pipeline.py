"""The extraction job: files -> converted text -> chunks -> records, written as they are made.

Output is JSONL, one record per line: the extracted fields, ``_grounding`` (per field: status,
span, page) and ``_provenance``. ``OUT.progress.jsonl`` marks each finished document (its hash
and the settings hash); a re-run skips finished documents and first drops any lines of
unfinished ones (and a half-written last line), so a crash or kill -9 at any point loses
nothing finished and duplicates nothing. Chunks that fail after every re-ask go to
``OUT.rejects.jsonl`` with their attempts. LLM calls go through the call cache, so re-doing an
unfinished document costs little.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localforge.extract.chunking import Chunk, chunk_text
from localforge.extract.convert import SUPPORTED, Converted, Converter, DocumentError
from localforge.extract.grounding import ground_record
from localforge.extract.routing import models, parse_rule, pick
from localforge.extract.schema import chunk_schema
from localforge.files import write_atomic

PROMPT_VERSION = "extract-v1"


@dataclass
class ExtractSettings:
    schema: dict
    backend: str = "auto"
    model: str = "smollm2-135m"
    base_url: str | None = None
    temperature: float = 0.0
    passes: int = 1
    concurrency: int = 4
    chunk_size: int = 384
    overlap: int = 48
    max_tokens: int = 512
    attempts: int = 3
    cache: bool = True
    examples: list[dict] = field(default_factory=list)  # [{"text": ..., "records": [...]}]
    pdf_mode: str = "auto"
    route: str | None = None  # with two models (--model small,large): when to use the large one

    def digest(self) -> str:
        """What decides the records: a re-run with other values is a different job."""
        keys = ("schema", "backend", "model", "base_url", "temperature", "passes", "chunk_size",
                "overlap", "max_tokens", "attempts", "examples", "route")
        blob = json.dumps({k: getattr(self, k) for k in keys} | {"v": PROMPT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Summary:
    documents: int = 0
    done: int = 0
    skipped: int = 0  # finished in an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)
    chunks: int = 0
    records: int = 0
    rejects: int = 0
    values: int = 0
    grounded: int = 0
    seconds: float = 0.0
    notices: list[str] = field(default_factory=list)

    @property
    def grounded_share(self) -> float:
        return self.grounded / self.values if self.values else 0.0


# --- files ---------------------------------------------------------------------------------------


def discover(paths: Iterable[Path], summary: Summary) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                summary.failed.append((str(p), f"no supported files in it ({', '.join(sorted(SUPPORTED))})"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            summary.failed.append((str(p), "no such file or folder"))
    return files


# --- resume --------------------------------------------------------------------------------------


class Ledger:
    """The output files, and which documents they hold completely."""

    def __init__(self, out: Path):
        self.out = out
        self.progress = sidecar(out, "progress")
        self.rejects = sidecar(out, "rejects")
        self.done: set[tuple[str, str]] = set()
        for line in _lines(self.progress):
            self.done.add((line["sha256"], line["settings"]))
        for path in (self.out, self.rejects):
            _keep_only(path, lambda row: (row["_provenance"]["file_sha256"], row["_provenance"]["settings"]) in self.done)
        out.parent.mkdir(parents=True, exist_ok=True)
        self._files = {p: open(p, "a", encoding="utf-8") for p in (self.out, self.rejects, self.progress)}

    def write(self, which: Path, row: dict) -> None:
        fh = self._files[which]
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()

    def finish(self, sha: str, settings: str, path: str, records: int) -> None:
        for which in (self.out, self.rejects):
            os.fsync(self._files[which].fileno())
        self.write(self.progress, {"sha256": sha, "settings": settings, "path": path, "records": records,
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        os.fsync(self._files[self.progress].fileno())
        self.done.add((sha, settings))

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()


def sidecar(out: Path, kind: str) -> Path:
    """``out.jsonl`` -> ``out.progress.jsonl`` / ``out.rejects.jsonl``."""
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.{kind}.jsonl")


def _lines(path: Path):
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash


def _keep_only(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite ``path`` without rows of unfinished documents (atomically); no-op when clean."""
    if not path.is_file():
        return
    raw = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = []
    for line in raw:
        try:
            if keep(json.loads(line)) and line.endswith("\n"):
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    if len(kept) != len(raw):
        write_atomic(path, "".join(kept))


# --- prompting -----------------------------------------------------------------------------------


def system_prompt(record_schema: dict) -> str:
    from localforge.backends.structured import _describe

    return (
        "You extract structured records from a document excerpt. "
        f"Return a JSON object {{\"records\": [...]}} where each record is {_describe(record_schema)}. "
        "Copy every value exactly as it is written in the excerpt. Include only facts the excerpt "
        "states; if it states none, return {\"records\": []}."
    )


def conversation(settings: ExtractSettings, excerpt: str) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt(settings.schema)}]
    for ex in settings.examples:
        msgs.append({"role": "user", "content": ex["text"]})
        msgs.append({"role": "assistant", "content": json.dumps({"records": ex["records"]}, ensure_ascii=False)})
    msgs.append({"role": "user", "content": excerpt})
    return msgs


def _dedupe_key(record: dict) -> str:
    def norm(v: Any) -> Any:
        if isinstance(v, str):
            return " ".join(v.split()).casefold()
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    return json.dumps(norm(record), sort_keys=True)


# --- the job -------------------------------------------------------------------------------------


def run(paths: Iterable[Path], out: Path, settings: ExtractSettings,
        on_event: Callable[..., None] | None = None, backend=None) -> Summary:
    """Extract records from ``paths`` into ``out``; ``on_event(kind, **data)`` reports progress."""
    from localforge.backends import get_backend
    from localforge.backends.base import RequestTooLarge
    from localforge.backends.server import ServerBackend
    from localforge.backends.structured import StructuredOutputError

    emit = on_event or (lambda kind, **data: None)
    summary = Summary()
    t0 = time.perf_counter()
    files = discover(paths, summary)
    summary.documents = len(files) + sum(1 for p, _ in summary.failed)
    emit("start", files=len(files))
    if not files:
        summary.seconds = time.perf_counter() - t0
        return summary

    converter = Converter(pdf_mode=settings.pdf_mode)
    if any(f.suffix.lower() == ".pdf" for f in files):
        summary.notices.append(converter.notice)
        emit("notice", text=converter.notice)
    digest = settings.digest()
    ledger = Ledger(out)
    given = backend
    backends: dict[str, Any] = {}

    def backend_for(model: str):
        if given is not None:
            return given
        if model not in backends:
            from localforge.backends import REGISTRY

            options: dict[str, Any] = {"cache": True if settings.cache else None}
            if settings.base_url:
                options["base_url"] = settings.base_url
            if REGISTRY.get(settings.backend) and REGISTRY[settings.backend].server:
                options["concurrency"] = settings.concurrency
            backends[model] = get_backend(settings.backend, model, **options)
        return backends[model]

    models(settings.model)  # a bad --model fails before any work
    if settings.route:
        parse_rule(settings.route)
    target = chunk_schema(settings.schema)
    prompt_hash = hashlib.sha256((system_prompt(settings.schema) + PROMPT_VERSION).encode()).hexdigest()[:16]
    try:
        for path in files:
            try:
                doc = converter.convert(path)
            except DocumentError as exc:
                summary.failed.append((str(path), str(exc).removeprefix(f"{path}: ")))
                emit("failed", path=str(path), reason=str(exc))
                continue
            if (doc.sha256, digest) in ledger.done:
                summary.skipped += 1
                emit("skipped", path=str(path))
                continue
            model = pick(settings.model, settings.route, doc.text, len(doc.pages))
            backend = backend_for(model)
            parallel = settings.concurrency if isinstance(backend, ServerBackend) else 1  # in-process engines are not thread-safe
            chunks = chunk_text(doc.text, settings.chunk_size, settings.overlap)
            emit("document", path=str(path), chunks=len(chunks) * settings.passes, model=model)
            kept: dict[str, tuple[dict, Chunk, int]] = {}

            def one(task: tuple[int, Chunk], text: str = doc.text, backend=backend):
                n_pass, chunk = task
                try:
                    obj = backend.generate_json(conversation(settings, chunk.prompt_text(text)), target,
                                                _params(settings, n_pass), attempts=settings.attempts)
                    return n_pass, chunk, obj.get("records", []), None
                except (StructuredOutputError, RequestTooLarge) as exc:
                    return n_pass, chunk, [], exc
                finally:
                    emit("chunk")

            tasks = [(p, c) for p in range(settings.passes) for c in chunks]
            if parallel > 1:
                with ThreadPoolExecutor(max_workers=parallel) as pool:
                    results = list(pool.map(one, tasks))
            else:
                results = [one(t) for t in tasks]
            for n_pass, chunk, records, error in results:
                summary.chunks += 1
                if error is not None:
                    summary.rejects += 1
                    ledger.write(ledger.rejects, {
                        "chunk": chunk.index, "span": [chunk.start, chunk.end], "pass": n_pass,
                        "error": str(error), "attempts": [asdict(a) for a in getattr(error, "attempts", [])],
                        "_provenance": _provenance(doc, chunk, n_pass, backend, model, digest, prompt_hash)})
                    continue
                for rec in records:
                    if isinstance(rec, dict):
                        kept.setdefault(_dedupe_key(rec), (rec, chunk, n_pass))
            for rec, chunk, n_pass in kept.values():
                grounding = ground_record(rec, doc.text, (chunk.start, chunk.end), doc.page_at)
                summary.values += len(grounding)
                summary.grounded += sum(g["status"] != "ungrounded" for g in grounding.values())
                ledger.write(ledger.out, {**rec, "_grounding": grounding,
                                          "_provenance": _provenance(doc, chunk, n_pass, backend, model, digest, prompt_hash)})
                summary.records += 1
            ledger.finish(doc.sha256, digest, str(path), len(kept))
            summary.done += 1
            emit("done", path=str(path), records=len(kept))
    finally:
        ledger.close()
        for be in backends.values():
            be.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _params(settings: ExtractSettings, n_pass: int):
    from localforge.backends import GenerationParams

    # Pass 0 is the configured sampling; further passes sample (at least 0.7) with their own seed.
    temperature = settings.temperature if n_pass == 0 else max(settings.temperature, 0.7)
    return GenerationParams(max_tokens=settings.max_tokens, temperature=temperature, seed=n_pass)


def _provenance(doc: Converted, chunk: Chunk, n_pass: int, backend, model: str,
                digest: str, prompt_hash: str) -> dict:
    return {
        "source": doc.path, "file_sha256": doc.sha256, "converter": doc.converter, "mode": doc.mode,
        "chunk": chunk.index, "chunk_span": [chunk.start, chunk.end], "page": doc.page_at(chunk.start),
        "backend": backend.name, "model": model, "prompt_hash": prompt_hash, "pass": n_pass,
        "settings": digest, "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
