"""Distillation datasets: the pair row, and export, verify, stats and import over JSONL files.

A pair (what ``teach`` writes, and what ``export`` reads) is one JSON object per line::

    instruction   what the student is asked (the user turn)
    completion    what it should answer (DCR's ``final`` is read as this)
    context       optional earlier messages (system, user, assistant turns before the instruction)
    quality       0..1 or null (DCR's ``score`` is read as this)
    feedback      the teacher's last critique, or null
    evidence      passages the answer rests on (a list)
    provenance    sources (record ids, document sha256, page and span; or log, line and turn),
                  teacher {backend, model}, prompt_sha256, signer_key_id, signed_at, created_at

``export`` writes the rows ``localforge finetune`` (and mlx-lm, TRL) read: chat ``messages`` or
``prompt`` + ``completion``. Everything else goes under one ``metadata`` key (and ``signature``
when signed): finetune's reader ignores keys it does not know, and one key keeps the training
columns clean. Every output is written to a temp file beside the target and renamed into place
when complete, so a failure never leaves a file that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from localforge.errors import ConfigError, UsageError
from localforge.teach import signing

FORMATS = ("messages", "prompt-completion")
ROLES = ("system", "user", "assistant", "tool")
HISTOGRAM_BINS = 5


# --- reading ---------------------------------------------------------------------------------

def _check_input(path: Path, flag: str) -> None:
    if not path.exists():
        raise ConfigError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: not a file (give a JSONL file)")


def read_lines(path: Path, flag: str = "IN", exact: bool = False) -> list[tuple[int, bytes]]:
    """(line number, raw bytes without the newline) for every non-blank line. Lines are split on
    ``\\n`` alone, so a stray control character never makes a line of its own; a CRLF line loses
    its ``\\r`` unless ``exact`` (verify keeps every byte)."""
    _check_input(path, flag)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    lines = data.split(b"\n")
    return [(n, line[:-1] if line.endswith(b"\r") and not exact else line)
            for n, line in enumerate(lines, 1) if line.strip()]


def parse_line(line: bytes) -> object:
    """A line's JSON value; ValueError with a short reason when it is not UTF-8 JSON."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_rows(path: Path, flag: str = "IN") -> list[tuple[int, dict]]:
    """Every row of a JSONL file as (line number, object); a ConfigError naming the file and the
    first bad line (and how many more) otherwise."""
    rows, errors = [], []
    for n, line in read_lines(path, flag):
        try:
            row = parse_line(line)
            if not isinstance(row, dict):
                raise ValueError("expected a JSON object")
            rows.append((n, row))
        except ValueError as exc:
            errors.append(f"{path} line {n}: {exc}")
    if errors:
        more = f" ({len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        raise ConfigError(f"{errors[0]}{more}: fix or remove the line")
    if not rows:
        raise ConfigError(f"{path}: no rows (expected JSONL: one JSON object per line)")
    return rows


# --- the pair --------------------------------------------------------------------------------

def _messages(value: object, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: messages[{i}] needs a role ({', '.join(ROLES)}) and string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def prompt_sha256(context: list[dict], instruction: str) -> str:
    """The hash of what was asked: the canonical JSON of the context and the user turn."""
    asked = [*context, {"role": "user", "content": instruction}]
    return hashlib.sha256(signing.dumps(asked).encode("utf-8")).hexdigest()


def _feedback(row: Mapping) -> str | None:
    """A pair's feedback; for DCR output without one, the critique of the draft that became
    ``final`` (else the last critique in its history): issues and suggestions joined by "; "."""
    if isinstance(row.get("feedback"), str):
        return row["feedback"]
    history = row.get("history")
    if isinstance(history, list):
        chosen = [h for h in history if isinstance(h, dict) and "final" in row and h.get("draft") == row["final"]]
        for step in [*chosen[-1:], *reversed(history)]:
            critique = step.get("critique") if isinstance(step, dict) else None
            if isinstance(critique, str):
                return critique
            if isinstance(critique, dict):
                parts = [str(x) for k in ("issues", "suggestions") if isinstance(critique.get(k), list)
                         for x in critique[k]]
                if parts:
                    return "; ".join(parts)
    return None


def _from_dcr(prov: object) -> dict:
    """``teach dcr``'s ``_provenance`` (source, line, item, teacher, student, prompt_hash, made_at)
    as a pair's provenance."""
    if not isinstance(prov, dict):
        return {}
    source = {k: prov[k] for k in ("source", "line", "item") if prov.get(k) is not None}
    found = {"sources": [source] if source else [], "teacher": prov.get("teacher"),
             "prompt_sha256": prov.get("prompt_hash"), "created_at": prov.get("made_at")}
    found.update({k: prov[k] for k in ("student", "settings") if k in prov})
    return found


def to_pair(row: Mapping, where: str) -> dict:
    """Read a row as a pair: a pair, a DCR output row (``final``, ``score``), or an exported row
    (``messages`` or ``prompt`` + ``completion``, with ``metadata``). ConfigError naming ``where``."""
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    context: list[dict] = []
    if "messages" in row:
        msgs = _messages(row["messages"], where)
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user":
            raise ConfigError(f"{where}: 'messages' must end with a user turn and the assistant's answer")
        context, instruction, completion = msgs[:-2], msgs[-2]["content"], msgs[-1]["content"]
    elif "instruction" in row:
        instruction = row["instruction"]
        completion = row.get("completion", row.get("final"))
        if "context" in row:
            context = _messages(row["context"], f"{where} 'context'")
    elif "prompt" in row:
        instruction, completion = row["prompt"], row.get("completion")
    else:
        raise ConfigError(f"{where}: no 'instruction' + 'completion' (or 'messages', or 'prompt' + 'completion')")
    for name, value in (("instruction", instruction), ("completion", completion)):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: '{name}' must be a non-empty string")
    quality = meta.get("quality", row.get("quality", row.get("score")))
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int | float)
                                or not math.isfinite(quality) or not 0 <= quality <= 1):
        raise ConfigError(f"{where}: 'quality' must be a number from 0 to 1 or null (got {quality!r})")
    evidence = meta.get("evidence", row.get("evidence")) or []
    if not isinstance(evidence, list):
        raise ConfigError(f"{where}: 'evidence' must be a list of passages")
    prov = meta.get("provenance", row.get("provenance")) or _from_dcr(row.get("_provenance"))
    if not isinstance(prov, dict):
        raise ConfigError(f"{where}: 'provenance' must be an object")
    sources = prov.get("sources") or []
    if not isinstance(sources, list):
        raise ConfigError(f"{where}: 'provenance.sources' must be a list")
    feedback = meta.get("feedback") if "feedback" in meta else _feedback(row)
    provenance = {
        "sources": sources,
        "teacher": prov.get("teacher"),
        "prompt_sha256": prov.get("prompt_sha256") or prompt_sha256(context, instruction),
        "created_at": prov.get("created_at"),
        "signer_key_id": None,
        "signed_at": None,
        **{k: v for k, v in prov.items() if k not in ("signer_key_id", "signed_at")},
    }
    pair = {"instruction": instruction, "completion": completion, "quality": quality,
            "feedback": feedback if isinstance(feedback, str) else None, "evidence": evidence,
            "provenance": provenance}
    if context:
        pair["context"] = context
    if "id" in row or "id" in meta:
        pair["id"] = meta.get("id", row.get("id"))
    return pair


def render_prompt(context: list[dict], instruction: str) -> str:
    """The prompt-completion prompt: the instruction alone; with earlier turns, a transcript
    ("System: ...", "User: ...", "Assistant: ...") ending in the instruction and "Assistant:"."""
    if not context:
        return instruction
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in context]
    return "\n\n".join([*turns, f"User: {instruction}", "Assistant:"])


def training_row(pair: dict, fmt: str) -> dict:
    """A pair as a row finetune reads, its quality, feedback, evidence and provenance in ``metadata``."""
    metadata = {k: pair[k] for k in ("id", "quality", "feedback", "evidence", "provenance") if k in pair}
    context = pair.get("context", [])
    if fmt == "messages":
        msgs = [*context, {"role": "user", "content": pair["instruction"]},
                {"role": "assistant", "content": pair["completion"]}]
        return {"messages": msgs, "metadata": metadata}
    return {"prompt": render_prompt(context, pair["instruction"]), "completion": pair["completion"],
            "metadata": metadata}


# --- writing ---------------------------------------------------------------------------------

def check_output(out: Path, inputs: Iterable[Path] = (), flag: str = "-o") -> None:
    """Refuse an output that cannot be written, before any work: a folder, a missing parent, the input."""
    if out.exists() and out.is_dir():
        raise UsageError(f"{flag} {out}: is a folder; give a file path for the JSONL output")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {out}: the folder {parent} is not writable")
    for src in inputs:
        if src.exists() and out.exists() and os.path.samefile(src, out):
            raise UsageError(f"{flag} {out}: is the input file; write to another path")


def write_rows_atomic(out: Path, rows: Iterable[dict], flag: str = "-o") -> int:
    """Write rows (canonical JSON, one per line) to a temp file beside ``out``, then rename it into
    place: a failure part-way leaves no ``out`` (and removes the temp file)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    except OSError as exc:
        raise ConfigError(f"{flag} {out}: cannot write it ({exc.strerror or exc})") from None
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(signing.dumps(row) + "\n")
                n += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(f"{flag} {out}: cannot write it ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


# --- export ----------------------------------------------------------------------------------

@dataclass
class ExportSummary:
    rows_in: int = 0
    written: int = 0
    below_quality: int = 0
    unscored: int = 0
    key_id: str | None = None
    format: str = "messages"


def check_export_options(fmt: str, min_quality: float | None) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if min_quality is not None and (not math.isfinite(min_quality) or not 0 <= min_quality <= 1):
        raise UsageError(f"--min-quality {min_quality}: give a number from 0 to 1")


def export(src: Path, out: Path, min_quality: float | None = None, fmt: str = "messages", sign: bool = False,
           environ: Mapping[str, str] | None = None, now: datetime | None = None) -> ExportSummary:
    """Pairs (or DCR output, or an earlier export) in ``src`` -> training rows in ``out``. With
    ``min_quality``, rows under it and unscored rows are left out. With ``sign``, each row carries an
    HMAC-SHA256 signature with the key from ``$LOCALFORGE_SIGNING_KEY``."""
    src, out = Path(src), Path(out)
    check_export_options(fmt, min_quality)
    key = signing.key_from_env(signing.KEY_ENV, environ) if sign else None
    _check_input(src, "IN")
    check_output(out, [src])
    stamp = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    pairs = [to_pair(row, f"{src} line {n}") for n, row in read_rows(src, "IN")]
    summary = ExportSummary(rows_in=len(pairs), key_id=key.key_id if key else None, format=fmt)
    rows = []
    for pair in pairs:
        if min_quality is not None:
            if pair["quality"] is None:
                summary.unscored += 1
                continue
            if pair["quality"] < min_quality:
                summary.below_quality += 1
                continue
        prov = pair["provenance"]
        prov["created_at"] = prov.get("created_at") or stamp
        if key:
            prov["signer_key_id"], prov["signed_at"] = key.key_id, stamp
        row = training_row(pair, fmt)
        try:
            signing.dumps(row).encode("utf-8")
        except (ValueError, UnicodeEncodeError) as exc:
            raise ConfigError(f"{src}: a row cannot be written as canonical JSON ({exc})") from None
        rows.append(signing.sign_row(row, key) if key else row)
    summary.written = write_rows_atomic(out, rows)
    return summary


# --- verify ----------------------------------------------------------------------------------

@dataclass
class VerifyReport:
    path: str
    rows: int = 0
    counts: Counter = field(default_factory=Counter)
    problems: list[tuple[int, str, str]] = field(default_factory=list)  # (line, status, detail)

    @property
    def ok(self) -> bool:
        return not self.problems and self.rows > 0


def keys_from_env(names: Iterable[str], environ: Mapping[str, str] | None = None,
                  what: str = "--keys") -> dict[str, signing.SigningKey]:
    keys = {}
    for name in names:
        key = signing.key_from_env(name, environ, what=what)
        keys[key.key_id] = key
    return keys


def verify(path: Path, key_envs: Iterable[str] = (signing.KEY_ENV,),
           environ: Mapping[str, str] | None = None) -> VerifyReport:
    """Check every line's signature (constant-time compare) and canonical bytes: each line is
    verified, unsigned, unknown-key, or tampered (which includes a line no longer readable)."""
    path, names = Path(path), list(key_envs)
    lines = read_lines(path, "FILE", exact=True)
    if not lines:
        raise ConfigError(f"FILE {path}: no rows to verify")
    keys = keys_from_env(names, environ, what="--keys" if names != [signing.KEY_ENV] else "verify")
    report = VerifyReport(str(path))
    for n, line in lines:
        report.rows += 1
        try:
            row = parse_line(line)
        except ValueError as exc:
            status, detail = "tampered", f"unreadable: {exc}"
        else:
            status, detail = signing.check_row(line, row, keys)
        report.counts[status] += 1
        if status != "verified":
            report.problems.append((n, status, detail))
    return report


# --- stats -----------------------------------------------------------------------------------

def _source_kind(source: object) -> str:
    if not isinstance(source, dict):
        return "other"
    for key, kind in (("record_id", "record"), ("document_sha256", "document"), ("log", "log"), ("source", "file")):
        if source.get(key) is not None:
            return kind
    return "other"


def stats(path: Path) -> dict:
    """Counts, quality distribution (min, mean, max, a histogram of 5 bins over 0..1), formats,
    signers (key ids), teachers and sources of a pair or exported file."""
    path = Path(path)
    rows = read_rows(path, "FILE")
    formats, signers, teachers, kinds = Counter(), Counter(), Counter(), Counter()
    documents, records, qualities, with_sources = set(), set(), [], 0
    for n, row in rows:
        pair = to_pair(row, f"{path} line {n}")
        formats["messages" if "messages" in row else "prompt-completion" if "prompt" in row else "pair"] += 1
        sig = row.get(signing.SIGNATURE)
        signers[sig.get("key_id", "?") if isinstance(sig, dict) else "unsigned"] += 1
        teacher = pair["provenance"].get("teacher")
        if isinstance(teacher, dict):
            teachers[f"{teacher.get('backend') or '?'}/{teacher.get('model') or '?'}"] += 1
        if pair["quality"] is not None:
            qualities.append(float(pair["quality"]))
        with_sources += bool(pair["provenance"]["sources"])
        for source in pair["provenance"]["sources"]:
            kinds[_source_kind(source)] += 1
            if isinstance(source, dict):
                if source.get("document_sha256"):
                    documents.add(str(source["document_sha256"]))
                if source.get("record_id") is not None:
                    records.add(str(source["record_id"]))
                if source.get("log"):
                    documents.add(str(source.get("log_sha256") or source["log"]))
                if source.get("source"):
                    documents.add(str(source["source"]))
    histogram = [0] * HISTOGRAM_BINS
    for q in qualities:
        histogram[min(int(q * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    edges = [round(i / HISTOGRAM_BINS, 2) for i in range(HISTOGRAM_BINS + 1)]
    return {
        "file": str(path),
        "rows": len(rows),
        "formats": dict(formats),
        "quality": {
            "scored": len(qualities),
            "unscored": len(rows) - len(qualities),
            "min": min(qualities) if qualities else None,
            "mean": round(sum(qualities) / len(qualities), 4) if qualities else None,
            "max": max(qualities) if qualities else None,
            "histogram": [{"from": edges[i], "to": edges[i + 1], "rows": histogram[i]} for i in range(HISTOGRAM_BINS)],
        },
        "signers": dict(signers),
        "teachers": dict(teachers),
        "sources": {"kinds": dict(kinds), "documents": len(documents), "records": len(records),
                    "rows_with_sources": with_sources},
    }


# --- import ----------------------------------------------------------------------------------

@dataclass
class ImportSummary:
    conversations: int = 0
    pairs: int = 0
    skipped_turns: int = 0  # assistant turns not right after a user turn (after a tool, first turn, ...)


def pairs_from_log(path: Path, now: datetime | None = None) -> tuple[list[dict], ImportSummary]:
    """Each assistant turn that answers a user turn becomes a pair: the user turn is the
    instruction, the assistant turn the completion, every message before the user turn the context
    (so a multi-turn conversation gives one pair per answer, each with its history). Assistant turns
    that follow anything else (a tool result, another assistant turn, nothing) are skipped and
    counted. Pairs are unscored (quality null) and name the log, its sha256, the line and the turn."""
    path = Path(path)
    rows = read_rows(path, "LOG")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    stamp = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    summary, pairs = ImportSummary(conversations=len(rows)), []
    for n, row in rows:
        where = f"{path} line {n}"
        if "messages" not in row:
            raise ConfigError(f"{where}: no 'messages' (a conversation log has one list of messages per line)")
        msgs = _messages(row["messages"], where)
        for i, msg in enumerate(msgs):
            if msg["role"] != "assistant":
                continue
            if i == 0 or msgs[i - 1]["role"] != "user" or not msg["content"].strip() \
                    or not msgs[i - 1]["content"].strip():
                summary.skipped_turns += 1
                continue
            context, instruction = msgs[: i - 1], msgs[i - 1]["content"]
            pair = {"id": f"{digest[:12]}:{n}:{i}", "instruction": instruction, "completion": msg["content"],
                    "quality": None, "feedback": None, "evidence": [],
                    "provenance": {"sources": [{"log": path.name, "log_sha256": digest, "line": n, "turn": i}],
                                   "teacher": None, "prompt_sha256": prompt_sha256(context, instruction),
                                   "created_at": stamp, "signer_key_id": None, "signed_at": None}}
            if context:
                pair["context"] = context
            pairs.append(pair)
    summary.pairs = len(pairs)
    return pairs, summary


def import_log(path: Path, out: Path, now: datetime | None = None) -> ImportSummary:
    path, out = Path(path), Path(out)
    _check_input(path, "LOG")
    check_output(out, [path])
    pairs, summary = pairs_from_log(path, now)
    if not pairs:
        raise ConfigError(f"{path}: no assistant turn answers a user turn; nothing to import")
    write_rows_atomic(out, pairs)
    return summary
