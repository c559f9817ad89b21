"""`localforge teach adaptive` and `localforge teach eval`: two-pass adaptive teaching (the ATLAS
protocol) over a JSONL file of questions, and its evaluation with and without the teaching.

Plain functions (``adaptive``, ``evaluate``), registered in ``commands/teach.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from localforge.commands import common
from localforge.commands.teach_common import (
    Config,
    StudentBackend,
    StudentBaseUrl,
    StudentModel,
    TeacherBackend,
    TeacherBaseUrl,
    TeacherModel,
    finish,
    role_flags,
    summary_table,
    with_progress,
)

ATLAS = "Adaptive teaching"
ProbeTokens = Annotated[int | None, typer.Option("--probe-tokens", min=1, rich_help_panel=ATLAS, help="Tokens the student may use to state its approach (default 50).")]
TeachingTokens = Annotated[int | None, typer.Option("--teaching-tokens", min=1, rich_help_panel=ATLAS, help="Tokens the teacher may use for its guidance (default 200).")]
AnswerTokens = Annotated[int | None, typer.Option("--answer-tokens", min=1, rich_help_panel=ATLAS, help="Tokens per student answer (default 256).")]
Concurrency = Annotated[int | None, typer.Option("--concurrency", min=1, rich_help_panel=ATLAS, help="Items in flight at once (default: the teacher server's parallel requests; 1 in-process).")]
Cache = Annotated[bool | None, typer.Option("--cache/--no-cache", rich_help_panel=ATLAS, help="Reuse answers from the call cache (default on).")]


def _flags(roles: dict, **given) -> dict:
    names = {"probe_tokens": "--probe-tokens", "teaching_tokens": "--teaching-tokens", "max_tokens": "--answer-tokens",
             "concurrency": "--concurrency", "cache": "--cache", "checker": "--checker"}
    return {**{key: (names[key], value) for key, value in given.items()}, **roles}


def adaptive(
    args: Annotated[list[str], typer.Argument(
        help="The JSONL file of questions (question; optional answer); key=value arguments override settings.",
        metavar="IN.jsonl [KEY=VALUE]...")],
    output: Annotated[str, typer.Option("--output", "-o", help="The JSONL file to write (appended; resumable; its folder is created).")],
    config: Config = None,
    probe_tokens: ProbeTokens = None,
    teaching_tokens: TeachingTokens = None,
    answer_tokens: AnswerTokens = None,
    concurrency: Concurrency = None,
    cache: Cache = None,
    teacher_backend: TeacherBackend = None,
    teacher_model: TeacherModel = None,
    teacher_base_url: TeacherBaseUrl = None,
    student_backend: StudentBackend = None,
    student_model: StudentModel = None,
    student_base_url: StudentBaseUrl = None,
) -> None:
    """Teach a student adaptively: it states its approach, the teacher scores it and guides it by band, it answers.

    Per question the student states its approach without solving (at most --probe-tokens); the teacher scores its understanding 0..1 and assigns a band (weak < 0.3, partial, strong > 0.7); it writes guidance for that band (at most --teaching-tokens: weak gets a decomposition with pitfalls and a check, partial the missing insight, strong edge cases or nothing); the student answers with the guidance.

    Settings come from --config FILE, then KEY=VALUE arguments (weak_below=0.25), then flags. Re-running skips finished questions and retries failed ones; exit code 1 when a question failed (each is in OUT.rejects.jsonl with its reason).
    """
    from localforge.errors import UsageError
    from localforge.teach.adaptive import check, load_adaptive_settings

    overrides, paths = common.split_args(args)
    if len(paths) != 1:
        raise UsageError("give one JSONL file of questions, e.g. `localforge teach adaptive questions.jsonl -o taught.jsonl`"
                         if not paths else f"give one JSONL file of questions, got {len(paths)}: {' '.join(paths)}")
    roles = role_flags(teacher_backend, teacher_model, teacher_base_url, student_backend, student_model,
                       student_base_url)
    flags = _flags(roles, probe_tokens=probe_tokens, teaching_tokens=teaching_tokens, max_tokens=answer_tokens,
                   concurrency=concurrency, cache=cache)
    settings = load_adaptive_settings(config, overrides, flags)
    check(paths[0], output)  # the questions and -o, before the progress bar: one line, no files
    for role in (settings.teacher, settings.student):
        common.engine_note(role.backend)
    from localforge.teach.adaptive import run

    summary = with_progress(lambda on_event: run(paths[0], output, settings, on_event), "questions")
    table = summary_table("teach adaptive", summary, "questions")
    table.add_row("bands", ", ".join(f"{b} {n}" for b, n in summary.bands.items()))
    finish(table, summary, Path(paths[0]), Path(output), "questions")


def evaluate(
    data: Annotated[str, typer.Option("--data", "-d", help="A JSONL file of questions with reference answers (question, answer; GSM8K style).")],
    output: Annotated[str, typer.Option("--output", "-o", help="The JSON report to write; the per-question rows go beside it (REPORT.rows.jsonl, resumable).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value arguments override settings.", metavar="[KEY=VALUE]...")] = None,
    checker: Annotated[str | None, typer.Option("--checker", rich_help_panel=ATLAS, help="number (the final number, the default) or judge (the teacher says whether an answer is right).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, rich_help_panel=ATLAS, help="Take the first N questions.")] = None,
    config: Config = None,
    probe_tokens: ProbeTokens = None,
    teaching_tokens: TeachingTokens = None,
    answer_tokens: AnswerTokens = None,
    concurrency: Concurrency = None,
    cache: Cache = None,
    teacher_backend: TeacherBackend = None,
    teacher_model: TeacherModel = None,
    teacher_base_url: TeacherBaseUrl = None,
    student_backend: StudentBackend = None,
    student_model: StudentModel = None,
    student_base_url: StudentBaseUrl = None,
) -> None:
    """Measure adaptive teaching: the student's answers without and with the teacher's guidance, checked.

    Reports accuracy without and with teaching, the gain, the non-degradation rate (the share of questions where teaching did not turn a correct answer wrong), the mean teaching length and the mean teaching reward, overall and per band; the rows beside the report show each question's band, both answers, whether each was right, and the teaching.

    Exit code 1 when a question failed (in REPORT.rows.rejects.jsonl with its reason); a re-run retries those and reuses the rest.
    """
    from localforge.errors import UsageError
    from localforge.teach.adaptive import load_adaptive_settings
    from localforge.teach.evaluate import check_eval, rows_path, run

    extra = [a for a in overrides or [] if "=" not in a]
    if extra:
        raise UsageError(f"unknown argument {extra[0]!r}: give the questions with --data FILE and settings as key=value")
    if checker is not None and checker not in ("number", "judge"):
        raise UsageError(f"--checker {checker!r}: choose number or judge")
    roles = role_flags(teacher_backend, teacher_model, teacher_base_url, student_backend, student_model,
                       student_base_url)
    flags = _flags(roles, probe_tokens=probe_tokens, teaching_tokens=teaching_tokens, max_tokens=answer_tokens,
                   concurrency=concurrency, cache=cache, checker=checker)
    settings = load_adaptive_settings(config, list(overrides or []), flags)
    check_eval(data, output, limit)
    for role in (settings.teacher, settings.student):
        common.engine_note(role.backend)
    holder = {}

    def go(on_event):
        holder["report"], summary = run(data, output, settings, limit, on_event)
        return summary

    summary = with_progress(go, "questions")
    report = holder["report"]
    table = summary_table("teach eval", summary, "questions")

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    for name, fig in [("all", report), *report["per_band"].items()]:
        table.add_row(f"{name} (n={fig['n']})",
                      f"accuracy {pct(fig['accuracy_without'])} -> {pct(fig['accuracy_with'])}, "
                      f"gain {pct(fig['gain'])}, non-degradation {pct(fig['non_degradation_rate'])}, "
                      f"teaching {_num(fig['mean_teaching_tokens'], '.1f')} tokens, "
                      f"reward {_num(fig['mean_reward'], '+.3f')}")
    table.add_row("report", str(output))
    table.add_row("rows", str(rows_path(output)))
    finish(table, summary, Path(data), rows_path(output), "questions", show_output=False)


# --- shared ----------------------------------------------------------------------------------------


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


