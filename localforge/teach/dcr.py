"""Draft-Critique-Revise: a teacher model improves answers, item by item, over a JSONL file.

An item is a row with ``instruction`` and, optionally, ``draft`` (the answer to improve; the
student writes one when it is missing), ``evidence`` (a list of passages the answer must keep to)
and ``rubric`` (what a good answer does). Per item, up to ``max_iterations`` times:

1. the teacher critiques the current draft (structured: ``score`` 0..1, ``issues``, ``suggestions``);
2. with evidence, the teacher checks the draft's claims against it (structured: each claim,
   supported or not, and the number of the passage that supports it); the score is then capped
   at the share of claims the evidence supports;
3. a score at or above ``threshold`` ends the item; otherwise, while iterations remain, the
   teacher rewrites the draft from its critique and the next iteration critiques the rewrite.

The output row is the input row plus ``final`` (the best-scored draft; the latest among equals),
``score``, ``iterations`` (drafts critiqued), ``passed`` and ``history`` (every draft with who
wrote it, its critique, its verification and its score), and ``_provenance``. An item whose
teacher (or student) cannot be reached, or answers garbage after every re-ask, is written to
``OUT.rejects.jsonl`` with the reason; the run goes on, and a re-run tries it again. The output
is resumable (``localforge.resumable``): finished items are skipped, a half-written line dropped.

Items run in parallel when the teacher is a server (``Capabilities.parallel``); a model that
runs in-process answers one call at a time (a lock per loaded model).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localforge.errors import ConfigError
from localforge.teach.batch import Calls, Models, check_out, read_jsonl, run_batch
from localforge.teach.settings import PROMPT_VERSION, TeachSettings

JOB = "teach dcr"
MAX_CLAIMS = 6
MAX_NOTES = 4  # issues and suggestions per critique
NOTE_CHARS = 200

CRITIQUE_SCHEMA = {
    "type": "object",
    "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "issues": {"type": "array", "items": {"type": "string", "maxLength": NOTE_CHARS}, "maxItems": MAX_NOTES},
        "suggestions": {"type": "array", "items": {"type": "string", "maxLength": NOTE_CHARS}, "maxItems": MAX_NOTES},
    },
    "required": ["score", "issues", "suggestions"],
    "additionalProperties": False,
}


def verification_schema(passages: int) -> dict:
    """Each claim of the draft, supported or not, with the number of the passage (0-based) or null."""
    claim = {
        "type": "object",
        "properties": {
            "claim": {"type": "string", "minLength": 1, "maxLength": NOTE_CHARS},
            "supported": {"type": "boolean"},
            "passage": {"type": ["integer", "null"], "minimum": 0, "maximum": max(passages - 1, 0)},
        },
        "required": ["claim", "supported", "passage"],
        "additionalProperties": False,
    }
    return {"type": "object", "properties": {"claims": {"type": "array", "items": claim, "maxItems": MAX_CLAIMS}},
            "required": ["claims"], "additionalProperties": False}


# --- the input -----------------------------------------------------------------------------------


@dataclass
class Item:
    line: int  # 1-based line of the input file
    row: dict  # the row as given (its other keys are kept in the output)
    key: str  # content hash, and which copy of that content (stable when lines move)

    @property
    def instruction(self) -> str:
        return self.row["instruction"]

    @property
    def draft(self) -> str | None:
        return self.row.get("draft") or None

    @property
    def evidence(self) -> list[str]:
        return list(self.row.get("evidence") or [])

    @property
    def rubric(self) -> str | None:
        rubric = self.row.get("rubric")
        if isinstance(rubric, list):
            return "\n".join(f"- {r}" for r in rubric) or None
        return rubric or None


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object with \"instruction\", got {type(row).__name__}")
    text = row.get("instruction")
    if "instruction" not in row:
        raise ConfigError(f"{where}: \"instruction\" is missing: give each row the task to answer")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: \"instruction\" must be a non-empty string, got {text!r:.60}")
    if row.get("draft") is not None and not isinstance(row["draft"], str):
        raise ConfigError(f"{where}: \"draft\" must be a string (or left out), got {type(row['draft']).__name__}")
    evidence = row.get("evidence")
    if evidence is not None and (not isinstance(evidence, list) or not all(isinstance(e, str) for e in evidence)):
        raise ConfigError(f"{where}: \"evidence\" must be a list of passages (strings), got {json.dumps(evidence)[:60]}")
    rubric = row.get("rubric")
    if rubric is not None and not isinstance(rubric, str) and not (
            isinstance(rubric, list) and all(isinstance(r, str) for r in rubric)):
        raise ConfigError(f"{where}: \"rubric\" must be a string or a list of strings, got {type(rubric).__name__}")


def read_items(path: str | Path) -> list[Item]:
    """Every item of a JSONL file, checked (``batch.read_jsonl``)."""
    return [Item(n, row, key) for n, row, key in read_jsonl(Path(path), _check_row, "items", "instruction")]


# --- prompts -------------------------------------------------------------------------------------


def _passages(evidence: list[str]) -> str:
    return "\n".join(f"[{i}] {p}" for i, p in enumerate(evidence))


def draft_conversation(item: Item) -> list[dict]:
    text = item.instruction
    if item.evidence:
        text = f"{text}\n\nUse these passages:\n{_passages(item.evidence)}"
    return [{"role": "user", "content": text}]


def _task(item: Item) -> str:
    parts = [f"Instruction:\n{item.instruction}"]
    if item.evidence:
        parts.append(f"Passages:\n{_passages(item.evidence)}")
    if item.rubric:
        parts.append(f"Rubric:\n{item.rubric}")
    return "\n\n".join(parts)


def critique_conversation(item: Item, draft: str) -> list[dict]:
    return [
        {"role": "system", "content": (
            "You are a strict teacher reviewing an answer. Score it from 0 (wrong or useless) to 1 "
            "(correct, complete and clear), list its concrete issues, and suggest how to fix each."
            + (" Judge it by the rubric." if item.rubric else ""))},
        {"role": "user", "content": f"{_task(item)}\n\nAnswer to review:\n{draft}"},
    ]


def verify_conversation(item: Item, draft: str) -> list[dict]:
    return [
        {"role": "system", "content": (
            "You check an answer against numbered passages. List each factual claim the answer makes; "
            "for each, say whether a passage supports it, and give that passage's number (null if none does).")},
        {"role": "user", "content": f"Passages:\n{_passages(item.evidence)}\n\nAnswer to check:\n{draft}"},
    ]


def rewrite_conversation(item: Item, draft: str, critique: dict, verification: dict | None) -> list[dict]:
    notes = [f"- issue: {i}" for i in critique.get("issues", [])]
    notes += [f"- suggestion: {s}" for s in critique.get("suggestions", [])]
    if verification:
        notes += [f"- not supported by the passages: {c['claim']}" for c in verification["claims"] if not c["supported"]]
    feedback = "\n".join(notes) or "- make it more correct, complete and clear"
    return [
        {"role": "system", "content": (
            "You are a teacher rewriting an answer. Fix every point of the feedback"
            + ("; state only facts the passages support" if item.evidence else "")
            + ". Reply with the improved answer alone.")},
        {"role": "user", "content": f"{_task(item)}\n\nAnswer:\n{draft}\n\nFeedback:\n{feedback}"},
    ]


def prompt_hash() -> str:
    probe = Item(0, {"instruction": "I", "evidence": ["E"], "rubric": "R"}, "")
    text = json.dumps([critique_conversation(probe, "D"), verify_conversation(probe, "D"),
                       rewrite_conversation(probe, "D", {"issues": [], "suggestions": []}, None),
                       CRITIQUE_SCHEMA, verification_schema(1), PROMPT_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- one item ------------------------------------------------------------------------------------


def assess(item: Item, draft: str, calls: Calls) -> tuple[dict, dict | None, float]:
    """The teacher's critique of ``draft`` (score, issues, suggestions), its check of the draft's
    claims against the item's evidence (None without evidence), and the score: the critique's,
    capped at the share of claims the evidence supports. Raises ``ItemFailed``."""
    critique = calls.json("critique", critique_conversation(item, draft), CRITIQUE_SCHEMA)
    score = min(1.0, max(0.0, float(critique["score"])))
    verification = None
    if item.evidence:
        found = calls.json("verify", verify_conversation(item, draft), verification_schema(len(item.evidence)))
        verification = _verification(found, item.evidence)
        if verification["claims"]:
            score = min(score, verification["supported_share"])
    return critique, verification, round(score, 4)


def improve(item: Item, models: Models, settings: TeachSettings) -> dict:
    """Draft (when needed), then critique, verify and rewrite until the threshold or the last
    iteration: ``{final, score, iterations, passed, history}``. Raises ``ItemFailed``."""
    calls = Calls(models, settings)
    history = calls.history
    draft, by = item.draft, "given"
    if draft is None:
        draft = calls.text("draft", models.student, draft_conversation(item), settings.max_tokens, required=True)[0]
        by = "student"
    for iteration in range(1, settings.max_iterations + 1):
        critique, verification, score = assess(item, draft, calls)
        history.append({"iteration": iteration, "draft": draft, "by": by, "critique": critique,
                        "verification": verification, "score": score})
        if score >= settings.threshold or iteration == settings.max_iterations:
            break
        draft = calls.text("rewrite", models.teacher, rewrite_conversation(item, draft, critique, verification),
                           settings.max_tokens, required=True)[0]
        by = "teacher"
    best = max(history, key=lambda h: (h["score"], h["iteration"]))
    return {"final": best["draft"], "score": best["score"], "iterations": len(history),
            "passed": best["score"] >= settings.threshold, "history": history}


def _verification(found: dict, evidence: list[str]) -> dict:
    """The teacher's claims with the text of each supporting passage; a claim marked supported
    without a passage (or with one that does not exist) counts as not supported."""
    claims = []
    for c in found.get("claims", []):
        n = c.get("passage")
        real = isinstance(n, int) and not isinstance(n, bool) and 0 <= n < len(evidence)
        supported = bool(c.get("supported")) and real
        claims.append({"claim": c.get("claim", ""), "supported": supported, "passage": n if real else None,
                       "passage_text": evidence[n] if real and supported else None})
    share = sum(c["supported"] for c in claims) / len(claims) if claims else 1.0
    return {"claims": claims, "supported_share": round(share, 4)}


# --- the batch -----------------------------------------------------------------------------------


@dataclass
class Summary:
    items: int = 0
    done: int = 0
    skipped: int = 0  # finished in an earlier run
    passed: int = 0  # done items whose score reached the threshold
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line, one-line reason)
    iterations: int = 0
    seconds: float = 0.0
    concurrency: int = 1

    @property
    def mean_score(self) -> float:
        return self._score / self.done if self.done else 0.0

    _score: float = 0.0


def check(input: str | Path, out: str | Path) -> list[Item]:
    """Everything checked before a run: the items and the output path (one-line errors, no files made)."""
    items = read_items(input)
    check_out(input, out, JOB)
    return items


def run(input: str | Path, out: str | Path, settings: TeachSettings,
        on_event: Callable[..., None] | None = None, teacher=None, student=None) -> Summary:
    """Improve every item of ``input`` into ``out``; ``on_event(kind, **data)`` reports progress
    (``start`` total/skipped/concurrency, then ``item`` with status done or failed)."""
    out = Path(out)
    items = check(input, out)
    models = Models(settings, teacher, student)  # a model that cannot load fails here, before any file

    def tally(summary: Summary, result: dict) -> None:
        summary.passed += result["passed"]
        summary.iterations += result["iterations"]
        summary._score += result["score"]

    return run_batch(items, Path(input), out, settings, models, lambda item: improve(item, models, settings),
                     job=JOB, summary=Summary(items=len(items)), phash=prompt_hash(),
                     label=lambda item: {"instruction": item.instruction},
                     progress=lambda result: {"score": result["score"], "passed": result["passed"]},
                     tally=tally, on_event=on_event)
