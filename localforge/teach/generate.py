"""Training pairs from extracted records: ``localforge teach generate RECORDS.jsonl -o PAIRS.jsonl``.

The input is what ``localforge extract`` wrote: one record per line, with ``_grounding`` (per
field: status and character span in the document's converted text) and ``_provenance``. Per record:

1. the facts: the record's values whose grounding is at least ``grounding`` (``fuzzy`` by default:
   exact, normalized or fuzzy). When the source document is still there and unchanged (same
   sha256), every span is re-read from it and must still hold its value; a value that is
   ungrounded, or whose span no longer holds it, is never used. A record with no such value is
   not used (the summary names its line); records of documents that extract has not finished
   are left for later;
2. the passages: the source text around the facts' spans (``context_chars`` on each side), shown
   to the teacher and kept as the pair's evidence;
3. questions: the teacher writes ``pairs_per_record`` questions whose answer is the facts
   (structured; re-asked when two questions are the same, or one gives every value away);
4. answers: per question, the teacher answers from the facts; the answer must state every
   fact's value as written (numbers in any written form) and no ungrounded value of the record,
   else it is re-asked with what was missing. When it still is not after every ask, the answer
   is written from the values themselves (``answer_by: values``; ``answer_fallback: false``
   fails the record instead);
5. quality: with ``judge``, the teacher critiques each pair against the passages (``teach dcr``'s
   critique and claim check): ``quality`` is the score, ``feedback`` the issues.

Each output line is a pair in the shape ``teach dataset export`` reads (``instruction``,
``completion``, ``quality``, ``feedback``, ``evidence``, ``provenance``), plus ``id``,
``answer_by`` and ``review`` (the critique and the claim check). ``provenance.sources`` has one
entry per fact used: the record id, the records file and line, the document and its sha256, the
field, the value, its page and its character span, and how it was grounded. The output is
resumable like every teach verb's (``localforge.resumable``); records whose teacher cannot be
reached, or whose questions are still unusable after every ask, go to the rejects file.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from localforge.errors import ConfigError
from localforge.extract.grounding import _normalized, mentions, span_holds, walk_values
from localforge.extract.records import (
    GROUNDED,
    fields_of,
    finished_documents,
    id_of,
    is_record,
    source_path,
    source_text,
)
from localforge.settings import load_settings
from localforge.teach import dcr
from localforge.teach.batch import Calls, ItemFailed, Models, check_out, read_jsonl, run_batch
from localforge.teach.settings import Role, TeacherSettings

JOB = "teach generate"
PROMPT_VERSION = "generate-v1"
QUESTION_CHARS = 200
RUBRIC = ("The answer gives exactly the facts the question asks for, as the passages state them, "
          "and nothing the passages do not support.")


class GenerateSettings(TeacherSettings):
    """What decides ``teach generate``: the teacher, how many pairs per record, which groundings
    count, how much source text the teacher sees, and whether it scores the pairs."""

    DECIDES: ClassVar[tuple[str, ...]] = (*TeacherSettings.DECIDES, "pairs_per_record", "grounding",
                                          "context_chars", "judge", "answer_fallback")
    VERSION: ClassVar[str] = PROMPT_VERSION

    teacher: Role = Field(default_factory=Role, description="the model that writes the questions and answers, and scores them")
    max_tokens: int = Field(256, ge=16, description="tokens per set of questions and per answer")
    pairs_per_record: int = Field(1, ge=1, le=8, description="questions (pairs) written per record")
    grounding: Literal["exact", "normalized", "fuzzy"] = Field(
        "fuzzy", description="the weakest grounding whose values may be used (exact > normalized > fuzzy)")
    context_chars: int = Field(300, ge=0, le=5000, description="source characters on each side of the facts, shown to the teacher and kept as evidence")
    judge: bool = Field(True, description="the teacher scores each pair against the passages (quality, feedback)")
    answer_fallback: bool = Field(True, description="an answer that still leaves out a value is written from the values (false: the record fails)")


def load_generate_settings(path: str | Path | None = None, overrides: list[str] = (),
                           flags: dict | None = None) -> GenerateSettings:
    return load_settings(GenerateSettings, path, overrides, flags)


# --- the input -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    field: str  # the path in the record (maker, specs.power, ports[0])
    value: Any
    status: str  # exact, normalized, fuzzy
    start: int
    end: int
    page: int | None


@dataclass
class Item:
    line: int  # 1-based line of the records file
    row: dict  # the record as written
    key: str  # content hash, and which copy of that content
    record_id: str = ""
    facts: list[Fact] = field(default_factory=list)
    left_out: list[tuple[str, Any]] = field(default_factory=list)  # (field, value) never to be stated
    passages: list[str] = field(default_factory=list)
    passage_spans: list[list[int]] = field(default_factory=list)
    checked: bool = False  # the spans were re-read from the source document


def _check_record(row: Any, where: str) -> None:
    if not is_record(row):
        raise ConfigError(f"{where}: not a record written by `localforge extract` (it needs _grounding and "
                          "_provenance with source and file_sha256): give extract's output")


def _usable(name: str, value: Any, g: Any, allowed: tuple[str, ...], text: str | None) -> Fact | str:
    """The value as a fact, or why it cannot be one."""
    if not isinstance(g, dict) or g.get("status") not in GROUNDED:
        return "ungrounded"
    if g["status"] not in allowed:
        return f"grounded only {g['status']}"
    start, end = g.get("start"), g.get("end")
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
        return "no span"
    if text is not None and (end > len(text) or not span_holds(value, g["status"], text[start:end])):
        return "its span no longer holds it"
    page = g.get("page") if isinstance(g.get("page"), int) else None
    return Fact(name, value, g["status"], start, end, page)


def _passages(text: str, facts: list[Fact], chars: int) -> tuple[list[str], list[list[int]]]:
    """The source text around the facts: a window of ``chars`` on each side of every span, widened
    to whole words, overlapping windows merged, in document order."""
    windows: list[list[int]] = []
    for f in sorted(facts, key=lambda f: f.start):
        lo, hi = max(0, f.start - chars), min(len(text), f.end + chars)
        while lo > 0 and not text[lo - 1].isspace() and lo > f.start - chars - 40:
            lo -= 1
        while hi < len(text) and not text[hi].isspace() and hi < f.end + chars + 40:
            hi += 1
        if windows and lo <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], hi)
        else:
            windows.append([lo, hi])
    spans = []
    for lo, hi in windows:  # without the edge whitespace, so a span's text is its passage exactly
        while lo < hi and text[lo].isspace():
            lo += 1
        while hi > lo and text[hi - 1].isspace():
            hi -= 1
        spans.append([lo, hi])
    return [text[lo:hi] for lo, hi in spans], spans


@dataclass
class Prepared:
    items: list[Item]
    unused: list[tuple[int, str]]  # (line, why) for records with no usable value
    unfinished: int = 0  # records of documents extract has not finished
    unchecked: int = 0  # records whose document could not be re-read: spans taken as written


def prepare(path: str | Path, settings: GenerateSettings) -> Prepared:
    """The records of ``path`` as items with their facts and passages, checked before any output
    exists. A record with no usable value is listed in ``unused``, not made an item."""
    path = Path(path)
    rows = read_jsonl(path, _check_record, "records", "_grounding", cut_last=True)
    finished = finished_documents(path)
    allowed = GROUNDED[: GROUNDED.index(settings.grounding) + 1]
    texts: dict[str, str | None] = {}
    prepared = Prepared([], [])
    for line, row, key in rows:
        prov = row["_provenance"]
        sha = prov["file_sha256"]
        if finished is not None and sha not in finished:
            prepared.unfinished += 1
            continue
        if sha not in texts:
            texts[sha] = source_text(prov, path)
        text = texts[sha]
        item = Item(line, row, key, id_of(row), checked=text is not None)
        prepared.unchecked += text is None
        why: dict[str, int] = {}
        for name, value in walk_values(fields_of(row)):
            fact = _usable(name, value, row["_grounding"].get(name), allowed, text)
            if isinstance(fact, Fact):
                item.facts.append(fact)
            else:
                item.left_out.append((name, value))
                why[fact] = why.get(fact, 0) + 1
        if not item.facts:
            reasons = ", ".join(f"{n} {w}" for w, n in why.items()) or "no values"
            prepared.unused.append((line, f"no usable value ({reasons})"))
            continue
        if text is not None:
            item.passages, item.passage_spans = _passages(text, item.facts, settings.context_chars)
        prepared.items.append(item)
    return prepared


# --- prompts and checks --------------------------------------------------------------------------


def _label(name: str) -> str:
    return name.replace("_", " ").replace(".", " ")


def _facts(item: Item) -> str:
    return "\n".join(f"- {_label(f.field)}: {json.dumps(f.value, ensure_ascii=False)}" for f in item.facts)


def _context(item: Item) -> str:
    if not item.passages:
        return ""
    return "Passages from the document:\n" + "\n\n".join(f"[{i}] {p}" for i, p in enumerate(item.passages)) + "\n\n"


def question_keys(n: int) -> list[str]:
    """One key per question (``question``, or ``question_1`` ... ``question_n``): an object of named
    strings, which small models write far more reliably than an array of them."""
    return ["question"] if n == 1 else [f"question_{i}" for i in range(1, n + 1)]


def questions_schema(n: int) -> dict:
    text = {"type": "string", "minLength": 8, "maxLength": QUESTION_CHARS}
    keys = question_keys(n)
    return {"type": "object", "properties": dict.fromkeys(keys, text), "required": keys, "additionalProperties": False}


ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 1}},  # max_tokens bounds it
                 "required": ["answer"], "additionalProperties": False}


def questions_conversation(item: Item, n: int) -> list[dict]:
    many = "questions" if n > 1 else "question"
    return [
        {"role": "system", "content": (
            "You write training questions from facts taken from a document. Each question is one a reader "
            "of the document could ask, and its answer is the given facts: all of them, nothing else. "
            "Do not put the answer in the question." + (" Each question asks it a different way." if n > 1 else ""))},
        {"role": "user", "content": f"{_context(item)}Facts:\n{_facts(item)}\n\nWrite {n} {many} whose answer is these facts."},
    ]


def answer_conversation(item: Item, question: str) -> list[dict]:
    return [
        {"role": "system", "content": (
            "You answer a question from facts taken from a document. State every fact's value exactly as "
            "it is written in the facts, in one or two sentences, and add nothing the facts do not say.")},
        {"role": "user", "content": f"{_context(item)}Facts:\n{_facts(item)}\n\nQuestion: {question}"},
    ]


def check_questions(item: Item) -> Callable[[dict], None]:
    """Questions that differ, and none that already states every value (its answer given away)."""
    def check(obj: dict) -> None:
        seen = set()
        for key, q in obj.items():
            norm = _normalized(q.strip())[0]
            if norm in seen:
                raise ValueError(f"{key}: the same question twice; ask each a different way")
            seen.add(norm)
            if all(mentions(q, f.value) for f in item.facts):
                raise ValueError(f"{key}: it states every value, so it gives its answer away; ask for them instead")
    return check


def answer_problem(item: Item, answer: str) -> str | None:
    """What keeps ``answer`` from being grounded: a fact it leaves out, or an ungrounded value it states."""
    for f in item.facts:
        if not mentions(answer, f.value):
            return (f"answer: it leaves out {_label(f.field)} = {json.dumps(f.value, ensure_ascii=False)}; "
                    "state every value exactly as written in the facts")
    stated = [f.value for f in item.facts]
    for name, value in item.left_out:
        if isinstance(value, str) and len(value.strip()) >= 4 and mentions(answer, value) \
                and not any(isinstance(v, str) and mentions(v, value) for v in stated):
            return (f"answer: it states {_label(name)} = {json.dumps(value, ensure_ascii=False)}, which the document "
                    "does not support; leave it out")
    return None


def _check_answer(item: Item) -> Callable[[dict], None]:
    def check(obj: dict) -> None:
        problem = answer_problem(item, obj["answer"])
        if problem:
            raise ValueError(problem)
    return check


def values_answer(item: Item) -> str:
    """The answer written from the facts alone: each field and its value, as written."""
    return "; ".join(f"{_label(f.field).capitalize()}: {f.value}" for f in item.facts) + "."


def prompt_hash() -> str:
    probe = Item(0, {}, "", facts=[Fact("f", "V", "exact", 0, 1, None)], passages=["P"])
    text = json.dumps([questions_conversation(probe, 2), answer_conversation(probe, "Q"), questions_schema(2),
                       ANSWER_SCHEMA, RUBRIC, dcr.prompt_hash(), PROMPT_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- one record ----------------------------------------------------------------------------------


def pairs_for(item: Item, models: Models, settings: GenerateSettings) -> dict:
    """Questions, grounded answers and (with ``judge``) their quality for one record:
    ``{pairs: [...]}``. Raises ``ItemFailed`` (with what the record did so far)."""
    from localforge.backends import StructuredOutputError

    calls = Calls(models, settings)
    asked = calls.json("questions", questions_conversation(item, settings.pairs_per_record),
                       questions_schema(settings.pairs_per_record), settings.max_tokens, check_questions(item))
    questions = [asked[key].strip() for key in question_keys(settings.pairs_per_record)]
    calls.history.append({"stage": "questions", "questions": questions})
    pairs = []
    for i, question in enumerate(questions):
        try:
            answer = calls.json("answer", answer_conversation(item, question), ANSWER_SCHEMA, settings.max_tokens,
                                _check_answer(item))["answer"].strip()
            by, note = "teacher", None
        except ItemFailed as exc:
            if not (settings.answer_fallback and isinstance(exc.error, StructuredOutputError)):
                raise
            answer, by, note = values_answer(item), "values", str(exc)
        calls.history.append({"stage": "answer", "question": i, "answer": answer, "by": by, "note": note})
        quality, feedback, review = None, None, None
        if settings.judge:
            judged = dcr.Item(0, {"instruction": question, "evidence": item.passages, "rubric": RUBRIC}, "")
            critique, verification, quality = dcr.assess(judged, answer, calls)
            notes = [*critique.get("issues", []), *critique.get("suggestions", [])]
            feedback = "; ".join(notes) or None
            review = {"critique": critique, "verification": verification, "score": quality}
        pairs.append({"id": f"{item.record_id}-{i}", "instruction": question, "completion": answer,
                      "quality": quality, "feedback": feedback, "evidence": item.passages, "answer_by": by,
                      **({"answer_note": note} if note else {}), "review": review})
    return {"pairs": pairs}


def _sources(item: Item, records: Path) -> list[dict]:
    prov = item.row["_provenance"]
    return [{"record_id": item.record_id, "records": str(records), "line": item.line,
             "document": str(source_path(prov, records)), "document_sha256": prov["file_sha256"],
             "field": f.field, "value": f.value, "page": f.page, "span": [f.start, f.end], "grounding": f.status,
             "checked": item.checked} for f in item.facts]


# --- the batch -----------------------------------------------------------------------------------


@dataclass
class Summary:
    items: int = 0  # records with a usable value
    done: int = 0
    skipped: int = 0  # finished in an earlier run
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line, one-line reason)
    unused: list[tuple[int, str]] = field(default_factory=list)  # (line, why): records with no usable value
    unfinished: int = 0  # records of documents extract has not finished
    unchecked: int = 0  # records whose document could not be re-read
    pairs: int = 0
    by_values: int = 0  # answers written from the values (the teacher's still left one out)
    scored: int = 0
    seconds: float = 0.0
    concurrency: int = 1
    _quality: float = 0.0

    @property
    def mean_quality(self) -> float | None:
        return self._quality / self.scored if self.scored else None


def check(input: str | Path, out: str | Path, settings: GenerateSettings) -> Prepared:
    """Everything checked before a run: the records (and their sources) and the output path;
    one-line errors, no files made."""
    prepared = prepare(input, settings)
    if not prepared.items:
        why = (f"{prepared.unfinished} records are from documents extract has not finished; finish that run first"
               if prepared.unfinished and not prepared.unused else
               f"no record has a value grounded at least {settings.grounding!r} ({len(prepared.unused)} records, "
               f"line {prepared.unused[0][0]}: {prepared.unused[0][1]})" if prepared.unused else "no records")
        raise ConfigError(f"{input}: nothing to make pairs from: {why}")
    check_out(input, out, JOB, "pairs")
    return prepared


def run(input: str | Path, out: str | Path, settings: GenerateSettings,
        on_event: Callable[..., None] | None = None, teacher=None, prepared: Prepared | None = None) -> Summary:
    """Make pairs from every usable record of ``input`` into ``out``; ``on_event(kind, **data)``
    reports progress (``start`` total/skipped/concurrency, then ``item`` with status done or failed).
    ``prepared`` is what ``check`` returned, when the caller has checked already (the records and
    their sources are then read once)."""
    input, out = Path(input), Path(out)
    prepared = check(input, out, settings) if prepared is None else prepared
    models = Models(settings, teacher)  # a teacher that cannot load fails here, before any file
    summary = Summary(items=len(prepared.items), unused=prepared.unused, unfinished=prepared.unfinished,
                      unchecked=prepared.unchecked)
    phash = prompt_hash()

    def rows(item: Item, result: dict) -> list[dict]:
        provenance = {"sources": _sources(item, input), "teacher": models.describe(models.teacher),
                      "prompt_sha256": phash, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "evidence_spans": item.passage_spans}
        return [{**pair, "provenance": provenance} for pair in result["pairs"]]

    def tally(summary: Summary, result: dict) -> None:
        for pair in result["pairs"]:
            summary.pairs += 1
            summary.by_values += pair["answer_by"] == "values"
            if pair["quality"] is not None:
                summary.scored += 1
                summary._quality += pair["quality"]

    return run_batch(prepared.items, input, out, settings, models, lambda item: pairs_for(item, models, settings),
                     job=JOB, summary=summary, phash=phash, label=lambda item: {"record_id": item.record_id},
                     progress=lambda result: {"pairs": len(result["pairs"])}, tally=tally, on_event=on_event,
                     rows=rows)
