"""Two-pass adaptive teaching (the ATLAS protocol), item by item, over a JSONL file of questions.

An item is a row with ``question`` and, optionally, ``answer`` (a reference: the teacher sees it
only with ``teacher_sees_reference``; ``teach eval`` checks answers against it). Per item:

1. probe: the student states its approach in at most ``probe_tokens`` tokens, without solving;
2. score: the teacher scores the student's understanding from 0 to 1 (structured, through
   ``generate_json``: ``score`` and a short ``assessment``); the band follows from the score:
   ``weak`` below ``weak_below`` (0.3), ``strong`` above ``strong_above`` (0.7), ``partial`` between
   (both bounds included);
3. teach: the teacher writes guidance for that band within ``teaching_tokens`` tokens (200):
   weak gets a decomposition with pitfalls and a way to check; partial the missing insight and the
   misconception corrected; strong edge cases only, or nothing (the teacher answers NONE);
4. answer: the student answers the question with the guidance in its context.

The output row is the input row plus ``probe``, ``score``, ``assessment``, ``band``, ``teaching``,
``teaching_tokens`` (the teacher's tokens for the guidance; 0 when there is none), ``answer_with``
(the student's answer with the guidance) and ``_provenance``. An item whose teacher (or student)
cannot be reached, or answers garbage after every re-ask, goes to ``OUT.rejects.jsonl`` with the
stage and the reason; the run goes on, and a re-run tries it again. The output is resumable
(``localforge.resumable``), and items run in parallel on server teachers, as in ``teach dcr``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from localforge.errors import ConfigError
from localforge.settings import load_settings
from localforge.teach import batch
from localforge.teach.batch import Models, check_out, read_jsonl, row_key, run_batch
from localforge.teach.settings import TeachSettings

JOB = "teach adaptive"
PROMPT_VERSION = "atlas-v1"
BANDS = ("weak", "partial", "strong")
ASSESSMENT_CHARS = 120
NONE = "NONE"  # what a teacher answers when a strong student needs no guidance

SCORE_SCHEMA = {
    "type": "object",
    "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "assessment": {"type": "string", "maxLength": ASSESSMENT_CHARS},
    },
    "required": ["score", "assessment"],
    "additionalProperties": False,
}


class AdaptiveSettings(TeachSettings):
    """``TeachSettings`` plus what adaptive teaching and its evaluation decide. ``max_tokens`` is
    the student's answer length, ``critique_tokens`` the teacher's scoring answer."""

    probe_tokens: int = Field(50, ge=1, description="tokens the student may use to state its approach")
    teaching_tokens: int = Field(200, ge=1, description="tokens the teacher may use for its guidance")
    weak_below: float = Field(0.3, ge=0, le=1, description="a score below this is the weak band")
    strong_above: float = Field(0.7, ge=0, le=1, description="a score above this is the strong band")
    teacher_sees_reference: bool = Field(False, description="show the row's reference answer to the teacher")
    checker: Literal["number", "judge"] = Field("number", description="teach eval: how answers are checked")
    degradation_penalty: float = Field(2.0, ge=1, description="teach eval's reward: what a degrade costs, in improvements")

    @field_validator("strong_above")
    @classmethod
    def _ordered(cls, value: float, info: ValidationInfo) -> float:
        weak = info.data.get("weak_below")
        if weak is not None and value < weak:
            raise ValueError(f"must be at least weak_below ({weak}), got {value}")
        return value

    def digest(self) -> str:
        keys = ("probe_tokens", "teaching_tokens", "weak_below", "strong_above", "teacher_sees_reference")
        values = {"base": super().digest(), "v": PROMPT_VERSION} | {k: getattr(self, k) for k in keys}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def load_adaptive_settings(path: str | Path | None = None, overrides: list[str] = (),
                           flags: dict | None = None) -> AdaptiveSettings:
    return load_settings(AdaptiveSettings, path, overrides, flags)


def band(score: float, weak_below: float = 0.3, strong_above: float = 0.7) -> str:
    """``weak`` (score < weak_below), ``strong`` (score > strong_above), else ``partial``."""
    if score < weak_below:
        return "weak"
    if score > strong_above:
        return "strong"
    return "partial"


# --- the input -----------------------------------------------------------------------------------


@dataclass
class Item:
    line: int  # 1-based line of the input file
    row: dict
    key: str  # content hash, and which copy of that content

    @property
    def question(self) -> str:
        return self.row["question"]

    @property
    def reference(self) -> str | None:
        return self.row.get("answer") or None


def _check_row(row: Any, where: str, need_answer: bool) -> None:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object with \"question\", got {type(row).__name__}")
    if "question" not in row:
        raise ConfigError(f"{where}: \"question\" is missing: give each row the question to answer")
    text = row["question"]
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: \"question\" must be a non-empty string, got {text!r:.60}")
    answer = row.get("answer")
    if need_answer and (not isinstance(answer, str) or not answer.strip()):
        raise ConfigError(f"{where}: \"answer\" (the reference answer) must be a non-empty string, "
                          f"got {answer!r:.60}: teach eval checks the student's answers against it")
    if answer is not None and not isinstance(answer, str):
        raise ConfigError(f"{where}: \"answer\" must be a string (or left out), got {type(answer).__name__}")


def read_items(path: str | Path, need_answer: bool = False, limit: int | None = None,
               flag: str | None = None) -> list[Item]:
    """The items of a JSONL file (the first ``limit`` when given), checked (``batch.read_jsonl``)."""
    path = Path(path)
    rows = read_jsonl(path, lambda row, where: _check_row(row, where, need_answer), "questions", "question",
                      name=f"{flag} {path}" if flag else None, limit=limit)
    return [Item(n, row, key) for n, row, key in rows]


# --- prompts -------------------------------------------------------------------------------------

FINAL = "End with the final answer on its own line, after '#### '."


def probe_conversation(question: str, probe_tokens: int) -> list[dict]:
    return [
        {"role": "system", "content": (
            "Do not solve the problem and do not compute the answer. In at most "
            f"{max(probe_tokens * 3 // 4, 5)} words, say how you would approach it: "
            "what you would work out, and in which order.")},
        {"role": "user", "content": question},
    ]


def _reference(reference: str | None) -> str:
    return f"\n\nReference solution (for you only; never reveal its final answer):\n{reference}" if reference else ""


def score_conversation(question: str, probe: str, reference: str | None = None) -> list[dict]:
    return [
        {"role": "system", "content": (
            "You are a teacher. A student stated how it would approach a problem, without solving it. "
            "Score its understanding from 0 (no idea, or a wrong plan) to 1 (a complete, correct plan), "
            "and say in one sentence what it understood or missed.")},
        {"role": "user", "content": f"Problem:\n{question}{_reference(reference)}\n\nThe student's approach:\n"
                                    f"{probe or '(the student said nothing)'}"},
    ]


GUIDANCE = {
    "weak": ("The student's understanding is weak. Break the problem into small numbered steps, name the "
             "pitfalls to avoid, and say how to check the result. Do not give the final answer."),
    "partial": ("The student's understanding is partial. Give the one insight it is missing and correct its "
                "misconception, briefly. Do not give the final answer."),
    "strong": ("The student's understanding is strong. If its plan is complete, reply with exactly "
               f"{NONE}. Otherwise name only the edge cases to watch, in one or two sentences."),
}


def teach_conversation(question: str, probe: str, which: str, assessment: str, teaching_tokens: int,
                       reference: str | None = None) -> list[dict]:
    return [
        {"role": "system", "content": (
            f"You are a teacher guiding a student before it answers. {GUIDANCE[which]} "
            f"Use at most {max(teaching_tokens * 3 // 4, 5)} words.")},
        {"role": "user", "content": f"Problem:\n{question}{_reference(reference)}\n\nThe student's approach:\n"
                                    f"{probe or '(the student said nothing)'}\n\nYour assessment: {assessment}"},
    ]


def answer_conversation(question: str, teaching: str | None = None) -> list[dict]:
    text = question if not teaching else f"{question}\n\nA teacher's guidance:\n{teaching}"
    return [{"role": "system", "content": f"Solve the problem step by step. {FINAL}"},
            {"role": "user", "content": text}]


def prompt_hash() -> str:
    text = json.dumps([probe_conversation("Q", 50), score_conversation("Q", "P", "R"),
                       [teach_conversation("Q", "P", b, "A", 200, "R") for b in BANDS],
                       answer_conversation("Q", "T"), SCORE_SCHEMA, PROMPT_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- one item ------------------------------------------------------------------------------------


class Calls(batch.Calls):
    """``batch.Calls`` and the student's answer to a question, with or without guidance."""

    def answer(self, question: str, teaching: str | None = None) -> str:
        stage = "answer-with" if teaching else "answer-without"
        return self.text(stage, self.models.student, answer_conversation(question, teaching), self.settings.max_tokens)[0]


def teach(item: Item, models: Models, settings: AdaptiveSettings, calls: Calls | None = None) -> dict:
    """Probe, score, band, teach and answer with the guidance: ``{probe, score, assessment, band,
    teaching, teaching_tokens, answer_with}``. Raises ``ItemFailed``."""
    calls = calls or Calls(models, settings)
    reference = item.reference if settings.teacher_sees_reference else None
    probe, _ = calls.text("probe", models.student, probe_conversation(item.question, settings.probe_tokens),
                          settings.probe_tokens)
    calls.history.append({"stage": "probe", "text": probe})
    found = calls.json("score", score_conversation(item.question, probe, reference), SCORE_SCHEMA)
    score = round(min(1.0, max(0.0, float(found["score"]))), 4)
    which = band(score, settings.weak_below, settings.strong_above)
    calls.history.append({"stage": "score", "score": score, "band": which, "assessment": found["assessment"]})
    teaching, tokens = calls.text("teach", models.teacher, teach_conversation(
        item.question, probe, which, found["assessment"], settings.teaching_tokens, reference), settings.teaching_tokens)
    if which == "strong" and teaching.strip(" .").upper().startswith(NONE):
        teaching = ""
    if not teaching:
        tokens = 0
    calls.history.append({"stage": "teach", "text": teaching, "tokens": tokens})
    answer = calls.answer(item.question, teaching or None)
    return {"probe": probe, "score": score, "assessment": found["assessment"], "band": which,
            "teaching": teaching, "teaching_tokens": tokens, "answer_with": answer}


# --- the batch -----------------------------------------------------------------------------------


@dataclass
class Summary:
    items: int = 0
    done: int = 0
    skipped: int = 0  # finished in an earlier run
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line, one-line reason)
    bands: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BANDS, 0))
    seconds: float = 0.0
    concurrency: int = 1


def check(input: str | Path, out: str | Path, job: str = JOB, need_answer: bool = False,
          limit: int | None = None, flag: str | None = None) -> list[Item]:
    """Everything checked before a run: the items and the output path (one-line errors, no files made)."""
    items = read_items(input, need_answer, limit, flag)
    check_out(input, out, job)
    return items


def run_items(items: list[Item], input: Path, out: Path, settings: AdaptiveSettings,
              work: Callable[[Item, Models], dict], job: str, on_event: Callable[..., None] | None = None,
              teacher=None, student=None) -> tuple[Summary, list[dict]]:
    """Run ``work`` on every item not yet done in ``out`` (resumable, in parallel on server
    teachers); return the summary and the rows of this run's items (in input order), the ones
    finished in an earlier run included."""
    models = Models(settings, teacher, student)  # a model that cannot load fails here, before any file
    summary = run_batch(items, input, out, settings, models, lambda item: work(item, models), job=job,
                        summary=Summary(items=len(items)), phash=prompt_hash(),
                        label=lambda item: {"question": item.question},
                        progress=lambda result: {"band": result["band"]},
                        tally=lambda summary, result: None, on_event=on_event)
    t0 = time.perf_counter()
    digest = settings.digest()
    from localforge.resumable import read_rows

    wanted = {(it.key, digest): it.line for it in items}
    rows = [r for r in read_rows(out) if isinstance(r, dict) and _key(r) in wanted]
    rows.sort(key=lambda r: wanted[_key(r)])
    for row in rows:
        summary.bands[row["band"]] = summary.bands.get(row["band"], 0) + 1
    summary.seconds += time.perf_counter() - t0
    return summary, rows


def _key(row: dict):
    try:
        return row_key(row)
    except (KeyError, TypeError):
        return None


def run(input: str | Path, out: str | Path, settings: AdaptiveSettings,
        on_event: Callable[..., None] | None = None, teacher=None, student=None) -> Summary:
    """Teach every item of ``input`` into ``out``; ``on_event(kind, **data)`` reports progress
    (``start`` total/skipped/concurrency, then ``item`` with status done or failed)."""
    out = Path(out)
    items = check(input, out)
    summary, _ = run_items(items, Path(input), out, settings, lambda item, models: teach(item, models, settings),
                           JOB, on_event, teacher, student)
    return summary
