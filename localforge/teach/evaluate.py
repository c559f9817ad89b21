"""``teach eval``: does adaptive teaching help the student, and does it ever hurt?

Per question (a row with ``question`` and the reference ``answer``): the student answers without
teaching; then the two passes of ``teach.adaptive`` (probe, score and band, guidance) and the
student answers again with the guidance. A checker scores both answers against the reference
(``number``: the final number, GSM8K style; ``judge``: the teacher says whether the answer is
right). Each question is a row of ``REPORT.rows.jsonl`` (question, reference, band, both answers,
correct or not, the outcome, the teaching and its length, the reward); the rows file is resumable
like every teach output (``localforge.resumable``), and the report is a pure function of the rows
(``report``), so every figure can be recomputed from them:

- ``n``, ``accuracy_without``, ``accuracy_with``, ``gain`` (with minus without, as a share);
- ``non_degradation_rate``: the share of questions where teaching did not turn a correct answer wrong;
- ``mean_teaching_tokens`` (the teacher's tokens; 0 for no guidance), ``mean_reward``
  (``reward.teaching_reward`` with the configured degrade penalty, the budget ``teaching_tokens``);
- ``outcomes`` (improve, degrade, same-correct, same-wrong), and all of the above ``per_band``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from localforge.errors import UsageError
from localforge.resumable import check_output
from localforge.teach.adaptive import BANDS, AdaptiveSettings, Calls, Item, check, run_items, teach
from localforge.teach.checkers import get_checker
from localforge.teach.reward import RewardConfig, outcome, teaching_reward

JOB = "teach eval"
OUTCOMES = ("improve", "degrade", "same-correct", "same-wrong")

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"correct": {"type": "boolean"}},
    "required": ["correct"],
    "additionalProperties": False,
}


def rows_path(report: str | Path) -> Path:
    """``REPORT.json`` -> ``REPORT.rows.jsonl`` (beside it)."""
    report = Path(report)
    stem = report.name[: -len(".json")] if report.name.endswith(".json") else report.name
    return report.with_name(f"{stem}.rows.jsonl")


def judge_conversation(question: str, answer: str, reference: str) -> list[dict]:
    return [
        {"role": "system", "content": (
            "You grade a student's answer. It is correct when its final answer agrees with the reference "
            "answer; the working may differ.")},
        {"role": "user", "content": f"Question:\n{question}\n\nReference answer:\n{reference}\n\n"
                                    f"Student's answer:\n{answer or '(no answer)'}"},
    ]


def compare(item: Item, models, settings: AdaptiveSettings) -> dict:
    """One question: the answer without teaching, the adaptive teaching, both answers checked."""
    calls = Calls(models, settings)
    without = calls.answer(item.question)
    calls.history.append({"stage": "answer-without", "text": without})
    taught = teach(item, models, settings, calls)
    if settings.checker == "judge":
        def judge(question: str, answer: str, reference: str) -> bool:
            return bool(calls.json("judge", judge_conversation(question, answer, reference), JUDGE_SCHEMA)["correct"])

        checker = get_checker("judge", judge=judge)
    else:
        checker = get_checker(settings.checker)
    correct_without = bool(checker(without, item.reference, item.question))
    correct_with = bool(checker(taught["answer_with"], item.reference, item.question))
    config = RewardConfig(degradation_penalty=settings.degradation_penalty, token_budget=settings.teaching_tokens)
    return {**taught, "answer_without": without, "correct_without": correct_without, "correct_with": correct_with,
            "outcome": outcome(correct_without, correct_with),
            "reward": round(teaching_reward(correct_without, correct_with, taught["teaching_tokens"], config=config), 6)}


def _share(k: int, n: int) -> float | None:
    return round(k / n, 6) if n else None


def figures(rows: list[dict]) -> dict[str, Any]:
    """The figures over ``rows`` (None where there is no row)."""
    n = len(rows)
    outcomes = {k: sum(r["outcome"] == k for r in rows) for k in OUTCOMES}
    without = sum(bool(r["correct_without"]) for r in rows)
    with_ = sum(bool(r["correct_with"]) for r in rows)
    return {
        "n": n,
        "correct_without": without,
        "correct_with": with_,
        "accuracy_without": _share(without, n),
        "accuracy_with": _share(with_, n),
        "gain": _share(with_ - without, n),
        "non_degradation_rate": _share(n - outcomes["degrade"], n),
        "mean_teaching_tokens": round(sum(r["teaching_tokens"] for r in rows) / n, 6) if n else None,
        "mean_reward": round(sum(r["reward"] for r in rows) / n, 6) if n else None,
        "outcomes": outcomes,
    }


def report(rows: list[dict]) -> dict[str, Any]:
    """The whole report: the figures, and the same figures per band."""
    return {**figures(rows), "per_band": {b: figures([r for r in rows if r["band"] == b]) for b in BANDS}}


def check_eval(data: str | Path, out: str | Path, limit: int | None = None) -> list[Item]:
    """The data and both outputs, before any work (one-line errors, no files made)."""
    check_output(out, noun="report")
    if Path(out).resolve() == Path(data).resolve():
        raise UsageError(f"-o {out}: that is the --data file; give another file for the report")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: give 1 or more questions")
    return check(data, rows_path(out), JOB, need_answer=True, limit=limit, flag="--data")


def run(data: str | Path, out: str | Path, settings: AdaptiveSettings, limit: int | None = None,
        on_event: Callable[..., None] | None = None, teacher=None, student=None) -> tuple[dict, Any]:
    """Evaluate the first ``limit`` questions of ``data`` (all by default); write the rows and the
    report (``out``); return the report and the run's summary. Failed questions are in the rows'
    rejects file and counted in the report's ``failed``; the figures cover the questions done."""
    from localforge.files import write_atomic

    out = Path(out)
    items = check_eval(data, out, limit)
    rows_file = rows_path(out)
    summary, rows = run_items(items, Path(data), rows_file,
                              settings, lambda item, models: compare(item, models, settings), JOB, on_event,
                              teacher, student)
    result = report(rows)
    result.update({
        "data": str(data), "questions": len(items), "failed": len(summary.failed), "rows": str(rows_file),
        "checker": settings.checker,
        "teacher": rows[0]["_provenance"]["teacher"] if rows else None,
        "student": rows[0]["_provenance"]["student"] if rows else None,
        "settings": {k: getattr(settings, k) for k in (
            "probe_tokens", "teaching_tokens", "max_tokens", "weak_below", "strong_above", "temperature", "seed",
            "teacher_sees_reference", "degradation_penalty")},
    })
    try:
        write_atomic(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:
        from localforge.resumable import output_error

        raise output_error(out, exc) from None
    return result, summary
