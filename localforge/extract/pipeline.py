"""The extraction job: files -> converted text -> chunks -> records, written as they are made.

Output is JSONL, one record per line: the extracted fields, ``_id`` (``records.record_id``: the
document's hash and the fields), ``_grounding`` (per field: status, span, page) and
``_provenance``. ``OUT.progress.jsonl`` marks each finished document (its hash and the settings
hash); a re-run skips finished documents and first drops any lines of
unfinished ones (and a half-written last line), so a crash or kill -9 at any point loses
nothing finished and duplicates nothing. Chunks that fail after every re-ask go to
``OUT.rejects.jsonl`` with their attempts. LLM calls go through the call cache, so re-doing an
unfinished document costs little.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from localforge.backends import known_backend, server_url
from localforge.errors import UsageError
from localforge.extract.chunking import Chunk, chunk_text
from localforge.extract.convert import SUPPORTED, Converted, Converter, DocumentError
from localforge.extract.grounding import ground_record
from localforge.extract.records import record_id
from localforge.extract.routing import models, parse_rule, pick
from localforge.extract.schema import chunk_schema, echo_of, load_examples, load_schema
from localforge.resumable import (  # noqa: F401 (OutputBusy, output_files, sidecar: part of this module's API)
    OutputBusy,
    ResumableOutput,
    check_output,
    output_files,
    sidecar,
)
from localforge.resumable import check_free as _check_free
from localforge.settings import BackendChoice, load_settings

PROMPT_VERSION = "extract-v1"


class ExtractSettings(BackendChoice):
    """Everything that decides an extraction, as ``--config FILE`` holds it (flags and ``key=value``
    override it). After validation ``record_schema`` is the JSON Schema of one record and
    ``examples`` a list, whatever form they were given in."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    PATHS: ClassVar[tuple[str, ...]] = ("schema", "examples")  # read beside the config file when there

    record_schema: dict | str | None = Field(
        None, alias="schema", description="a JSON Schema file, module:Class (pydantic), or the schema itself")
    fields: str | None = Field(None, description='inline fields: "title:str, release:str, frequency_mhz:float"')
    examples: list[dict] | str | None = Field(None, description='few-shot examples: [{"text", "records"}] or a JSON file')
    route: str | None = Field(None, description="with --model SMALL,LARGE: when the large one is used")
    temperature: float = Field(0.0, ge=0, description="sampling temperature (0: greedy)")
    passes: int = Field(1, ge=1, description="independent passes, merged (more recall, more calls)")
    chunk_size: int = Field(384, ge=16, description="tokens per chunk")
    overlap: int = Field(48, ge=0, description="tokens shared by neighbouring chunks")
    max_tokens: int = Field(512, ge=1, description="tokens per answer (the records of one chunk)")
    attempts: int = Field(3, ge=1, description="asks per chunk before it is rejected")
    cache: bool = Field(True, description="reuse answers from the call cache")
    pdf_mode: Literal["auto", "native", "standard"] = Field(
        "auto", description="PDFs: native (docling's text layer), standard (its layout models, from $DOCLING_ARTIFACTS_PATH), auto (standard when they are there)")
    pdf_password: str | None = Field(None, description="opens encrypted PDFs (not part of the settings digest)")

    _a_known_backend = field_validator("backend")(known_backend)
    _a_server_url = field_validator("base_url")(server_url)  # the error names the flag, override or file

    @model_validator(mode="after")
    def _resolve(self) -> ExtractSettings:
        from localforge.backends import require

        if self.backend != "auto":
            require(self.backend)  # an unknown or missing backend fails before any work
        self.record_schema = load_schema(self.record_schema, self.fields)
        self.fields = None
        self.examples = load_examples(self.examples)
        if self.route:
            parse_rule(self.route)
        models(self.model)
        return self

    def digest(self) -> str:
        """What decides the records: a re-run with other values is a different job."""
        keys = ("backend", "model", "base_url", "temperature", "passes", "chunk_size",
                "overlap", "max_tokens", "attempts", "examples", "route")
        values = {k: getattr(self, k) for k in keys} | {"schema": self.record_schema, "v": PROMPT_VERSION}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def load_extract_settings(path: str | Path | None = None, overrides: list[str] = (),
                          flags: dict | None = None) -> ExtractSettings:
    """``ExtractSettings`` from a config file, ``key=value`` overrides and flags (see ``settings``)."""
    return load_settings(ExtractSettings, path, overrides, flags)


@dataclass
class Summary:
    documents: int = 0
    done: int = 0
    skipped: int = 0  # finished in an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)
    chunks: int = 0
    records: int = 0
    rejects: int = 0  # chunks that failed every ask
    rejected_records: int = 0  # records that only echoed the field names or an example
    values: int = 0
    grounded: int = 0
    seconds: float = 0.0
    notices: list[str] = field(default_factory=list)

    @property
    def grounded_share(self) -> float:
        return self.grounded / self.values if self.values else 0.0


# --- files ---------------------------------------------------------------------------------------


def check_paths(paths: Iterable[Path]) -> None:
    """Every path given exists (a typo stops the run before any work, in one line)."""
    for p in map(Path, paths):
        if not p.exists():
            raise UsageError(f"{p}: no such file or folder")


def discover(paths: Iterable[Path], summary: Summary) -> list[Path]:
    check_paths(paths)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                summary.failed.append((str(p), f"no supported files in it ({', '.join(sorted(SUPPORTED))})"))
            files.extend(found)
        else:
            files.append(p)
    return files


# --- the output ----------------------------------------------------------------------------------
# The resumable output is shared with the other jobs (localforge.resumable); extract's items are
# documents, keyed by (file sha256, settings digest).

def check_free(out: Path) -> None:
    """Refuse at once when another extract run holds ``out``."""
    _check_free(out, "extract")


class Ledger(ResumableOutput):
    """The output files, and which documents they hold completely (see ``localforge.resumable``)."""

    def __init__(self, out: Path):
        super().__init__(out, done_key=_done_key, row_key=_row_key, job="extract")

    def finish(self, sha: str, settings: str, path: str, records: int) -> None:  # type: ignore[override]
        super().finish({"sha256": sha, "settings": settings, "path": path, "records": records})


def _done_key(row: dict) -> tuple[str, str] | None:
    return (row["sha256"], str(row.get("settings"))) if isinstance(row.get("sha256"), str) else None


def _row_key(row: dict) -> tuple[str, str]:
    return row["_provenance"]["file_sha256"], row["_provenance"]["settings"]


# --- prompting -----------------------------------------------------------------------------------


def system_prompt(record_schema: dict) -> str:
    from localforge.backends import describe_schema

    return (
        "You extract structured records from a document excerpt. "
        f"Return a JSON object {{\"records\": [...]}} where each record is {describe_schema(record_schema)}. "
        "Copy every value exactly as it is written in the excerpt. Include only facts the excerpt "
        "states; if it states none, return {\"records\": []}."
    )


def conversation(settings: ExtractSettings, excerpt: str) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt(settings.record_schema)}]
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
    from localforge.backends import (
        RequestTooLarge,
        StructuredOutputError,
        generate_json,
        get_backend,
    )

    emit = on_event or (lambda kind, **data: None)
    check_output(out)
    check_free(out)
    summary = Summary()
    t0 = time.perf_counter()
    files = discover(paths, summary)
    summary.documents = len(files) + sum(1 for p, _ in summary.failed)
    emit("start", files=len(files))
    if not files:
        raise _nothing_read(summary)

    converter = Converter(pdf_mode=settings.pdf_mode, pdf_password=settings.pdf_password)
    digest = settings.digest()
    ledger: Ledger | None = None  # opened (and locked) when the first document converts: a run
    given = backend               # whose every file fails leaves no output files behind
    backends: dict[str, Any] = {}

    def backend_for(model: str):
        if given is not None:
            return given
        if model not in backends:
            backends[model] = get_backend(settings.backend, model, cache=settings.cache or None,
                                          **settings.backend_options())
        return backends[model]

    target = chunk_schema(settings.record_schema)
    prompt_hash = hashlib.sha256((system_prompt(settings.record_schema) + PROMPT_VERSION).encode()).hexdigest()[:16]
    try:
        for path in files:
            try:
                doc = converter.convert(path)
            except DocumentError as exc:
                summary.failed.append((str(path), str(exc).removeprefix(f"{path}: ")))
                emit("failed", path=str(path), reason=str(exc))
                continue
            ledger = ledger or Ledger(out)
            if path.suffix.lower() == ".pdf" and converter.notice not in summary.notices:
                summary.notices.append(converter.notice)  # once a PDF converted: which pipeline read it
                emit("notice", text=converter.notice)
            if (doc.sha256, digest) in ledger.done:
                summary.skipped += 1
                emit("skipped", path=str(path))
                continue
            model = pick(settings.model, settings.route, doc.text, len(doc.pages))
            backend = backend_for(model)
            parallel = backend.capabilities.parallel  # 1 for in-process engines: they are not thread-safe
            chunks = chunk_text(doc.text, settings.chunk_size, settings.overlap)
            emit("document", path=str(path), chunks=len(chunks) * settings.passes, model=model)
            kept: dict[str, tuple[dict, Chunk, int]] = {}

            def one(task: tuple[int, Chunk], text: str = doc.text, backend=backend):
                n_pass, chunk = task
                try:
                    obj = generate_json(backend, conversation(settings, chunk.prompt_text(text)), target,
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
            errors = []
            for n_pass, chunk, records, error in results:
                summary.chunks += 1
                if error is not None:
                    summary.rejects += 1
                    errors.append(error)
                    ledger.write(ledger.rejects, {
                        "chunk": chunk.index, "span": [chunk.start, chunk.end], "pass": n_pass,
                        "error": str(error), "attempts": [asdict(a) for a in getattr(error, "attempts", [])],
                        "_provenance": _provenance(doc, chunk, n_pass, backend, model, digest, prompt_hash)})
                    continue
                for rec in records:
                    if not isinstance(rec, dict):
                        continue
                    echo = echo_of(rec, settings.record_schema, settings.examples, chunk.body(doc.text))
                    if echo:
                        summary.rejected_records += 1
                        ledger.write(ledger.rejects, {
                            "chunk": chunk.index, "span": [chunk.start, chunk.end], "pass": n_pass,
                            "error": f"a record that {echo}, not facts from the text", "record": rec,
                            "attempts": [],
                            "_provenance": _provenance(doc, chunk, n_pass, backend, model, digest, prompt_hash)})
                        continue
                    kept.setdefault(_dedupe_key(rec), (rec, chunk, n_pass))
            if tasks and len(errors) == len(tasks):
                # nothing was extracted: the document failed (a re-run tries it again)
                reason = (f"every chunk was rejected ({len(tasks)}; see {ledger.rejects}); the first: "
                          + " ".join(str(errors[0]).split())[:200])
                summary.failed.append((str(path), reason))
                emit("failed", path=str(path), reason=f"{path}: {reason}")
                continue
            for rec, chunk, n_pass in kept.values():
                grounding = ground_record(rec, doc.text, (chunk.start, chunk.end), doc.page_at)
                summary.values += len(grounding)
                summary.grounded += sum(g["status"] != "ungrounded" for g in grounding.values())
                ledger.write(ledger.out, {**rec, "_id": record_id(rec, doc.sha256), "_grounding": grounding,
                                          "_provenance": _provenance(doc, chunk, n_pass, backend, model, digest, prompt_hash)})
                summary.records += 1
            ledger.finish(doc.sha256, digest, str(path), len(kept))
            summary.done += 1
            emit("done", path=str(path), records=len(kept))
    finally:
        if ledger is not None:
            ledger.close()
        for be in backends.values():
            be.close()
    if ledger is None:  # not one document could be read: nothing started, no output files
        raise _nothing_read(summary)
    summary.seconds = time.perf_counter() - t0
    return summary


def _nothing_read(summary: Summary) -> DocumentError:
    """The error of a run in which no document could be read: the first reason, and how many more."""
    if not summary.failed:
        return DocumentError("no files to extract from: give files or folders")
    path, reason = summary.failed[0]
    more = len(summary.failed) - 1
    return DocumentError(f"{path}: {reason}" + (f" (and {more} more file{'s' if more > 1 else ''} failed)" if more else ""))


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
