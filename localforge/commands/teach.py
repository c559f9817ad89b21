"""`localforge teach`: a teacher model improves answers for a student. `teach dcr` runs
Draft-Critique-Revise over a JSONL file; `teach dataset` exports, signs and checks the pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from localforge.commands import common, teach_adaptive, teach_dataset
from localforge.commands import teach_common as tc

app = typer.Typer(help="A teacher model improves answers and training data for a student.",
                  no_args_is_help=True, context_settings=common.HELP, pretty_exceptions_enable=False)
app.add_typer(teach_dataset.app, name="dataset")

DCR = "Draft-Critique-Revise"


@app.command("dcr", context_settings=common.HELP)
def dcr(
    args: Annotated[list[str], typer.Argument(
        help="The JSONL file of items (instruction; optional draft, evidence, rubric); key=value arguments override settings.",
        metavar="IN.jsonl [KEY=VALUE]...")],
    output: Annotated[str, typer.Option("--output", "-o", help="The JSONL file to write (appended; resumable; its folder is created).")],
    config: tc.Config = None,
    max_iterations: Annotated[int | None, typer.Option("--max-iterations", min=1, help="Drafts the teacher critiques per item, at most (default 3).", rich_help_panel=DCR)] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", min=0.0, max=1.0, help="A score this high (0..1) ends an item (default 0.8).", rich_help_panel=DCR)] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", min=1, help="Items in flight at once (default: the teacher server's parallel requests; 1 in-process).", rich_help_panel=DCR)] = None,
    cache: Annotated[bool | None, typer.Option("--cache/--no-cache", help="Reuse answers from the call cache (default on).", rich_help_panel=DCR)] = None,
    teacher_backend: tc.TeacherBackend = None,
    teacher_model: tc.TeacherModel = None,
    teacher_base_url: tc.TeacherBaseUrl = None,
    student_backend: tc.StudentBackend = None,
    student_model: tc.StudentModel = None,
    student_base_url: tc.StudentBaseUrl = None,
) -> None:
    """Improve answers with Draft-Critique-Revise: the student drafts, the teacher critiques, checks and rewrites.

    Per item the student drafts an answer (when the row has none); the teacher critiques it (a score 0..1, issues, suggestions), checks it against the row's evidence, and rewrites it, until the score reaches the threshold or the iterations run out.

    Settings come from --config FILE, then KEY=VALUE arguments (teacher.timeout=300), then flags. Re-running skips finished items and retries failed ones; exit code 1 when an item failed (each is in OUT.rejects.jsonl with its reason).
    """
    from localforge.errors import UsageError
    from localforge.teach.dcr import check
    from localforge.teach.settings import load_teach_settings

    overrides, paths = common.split_args(args)
    if len(paths) != 1:
        raise UsageError("give one JSONL file of items, e.g. `localforge teach dcr items.jsonl -o improved.jsonl`"
                         if not paths else f"give one JSONL file of items, got {len(paths)}: {' '.join(paths)}")
    flags = {"max_iterations": ("--max-iterations", max_iterations), "threshold": ("--threshold", threshold),
             "concurrency": ("--concurrency", concurrency), "cache": ("--cache", cache),
             **tc.role_flags(teacher_backend, teacher_model, teacher_base_url, student_backend, student_model,
                             student_base_url)}
    settings = load_teach_settings(config, overrides, flags)
    check(paths[0], output)  # the items and -o, before the progress bar: one line, no files
    for role in (settings.teacher, settings.student):
        common.engine_note(role.backend)
    _run_dcr(Path(paths[0]), Path(output), settings)


def _run_dcr(input: Path, output: Path, settings) -> None:
    from localforge.teach.dcr import run

    summary = tc.with_progress(lambda on_event: run(input, output, settings, on_event), "items")
    table = tc.summary_table("teach dcr", summary, "items")
    table.add_row("reached the threshold", f"{summary.passed}/{summary.done} (>= {settings.threshold})")
    table.add_row("mean score", f"{summary.mean_score:.2f}")
    table.add_row("iterations", f"{summary.iterations} (at most {settings.max_iterations} per item)")
    tc.finish(table, summary, input, output, "items")


app.command("adaptive", context_settings=common.HELP)(teach_adaptive.adaptive)
app.command("eval", context_settings=common.HELP)(teach_adaptive.evaluate)
