"""`localforge teach`: a teacher model improves answers for a student. `teach dcr` runs
Draft-Critique-Revise over a JSONL file; `teach dataset` exports, signs and checks the pairs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from localforge.commands import common, teach_adaptive, teach_dataset

app = typer.Typer(help="A teacher model improves answers and training data for a student.",
                  no_args_is_help=True, context_settings=common.HELP, pretty_exceptions_enable=False)
app.add_typer(teach_dataset.app, name="dataset")

TEACHER = "Teacher"
STUDENT = "Student"
DCR = "Draft-Critique-Revise"


@app.command("dcr", context_settings=common.HELP)
def dcr(
    args: Annotated[list[str], typer.Argument(
        help="The JSONL file of items (instruction; optional draft, evidence, rubric); key=value arguments override settings.",
        metavar="IN.jsonl [KEY=VALUE]...")],
    output: Annotated[str, typer.Option("--output", "-o", help="The JSONL file to write (appended; resumable; its folder is created).")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="A YAML file of teach settings (teacher:, student:, and the keys below).")] = None,
    max_iterations: Annotated[int | None, typer.Option("--max-iterations", min=1, help="Drafts the teacher critiques per item, at most (default 3).", rich_help_panel=DCR)] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", min=0.0, max=1.0, help="A score this high (0..1) ends an item (default 0.8).", rich_help_panel=DCR)] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", min=1, help="Items in flight at once (default: the teacher server's parallel requests; 1 in-process).", rich_help_panel=DCR)] = None,
    cache: Annotated[bool | None, typer.Option("--cache/--no-cache", help="Reuse answers from the call cache (default on).", rich_help_panel=DCR)] = None,
    teacher_backend: Annotated[str | None, typer.Option("--teacher-backend", callback=common.known_backend, rich_help_panel=TEACHER, help="auto (the default), or a backend from `localforge doctor`.")] = None,
    teacher_model: Annotated[str | None, typer.Option("--teacher-model", rich_help_panel=TEACHER, help="The teacher model (default: the embedded default model).")] = None,
    teacher_base_url: Annotated[str | None, typer.Option("--teacher-base-url", rich_help_panel=TEACHER, help="The teacher's server URL, for server backends.")] = None,
    student_backend: Annotated[str | None, typer.Option("--student-backend", callback=common.known_backend, rich_help_panel=STUDENT, help="auto (the default), or a backend from `localforge doctor`.")] = None,
    student_model: Annotated[str | None, typer.Option("--student-model", rich_help_panel=STUDENT, help="The student model, which drafts rows with no draft (default: the embedded default model).")] = None,
    student_base_url: Annotated[str | None, typer.Option("--student-base-url", rich_help_panel=STUDENT, help="The student's server URL, for server backends.")] = None,
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
             "teacher.backend": ("--teacher-backend", teacher_backend),
             "teacher.model": ("--teacher-model", teacher_model),
             "teacher.base_url": ("--teacher-base-url", teacher_base_url),
             "student.backend": ("--student-backend", student_backend),
             "student.model": ("--student-model", student_model),
             "student.base_url": ("--student-base-url", student_base_url)}
    settings = load_teach_settings(config, overrides, flags)
    check(paths[0], output)  # the items and -o, before the progress bar: one line, no files
    for role in (settings.teacher, settings.student):
        common.engine_note(role.backend)
    raise typer.Exit(_run_dcr(Path(paths[0]), Path(output), settings))


def _run_dcr(input: Path, output: Path, settings) -> int:
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from localforge.resumable import sidecar
    from localforge.teach.dcr import run

    console = common.console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
                  transient=False, disable=not console.is_terminal) as bar:  # logs get the summary alone
        task = bar.add_task("items", total=None, rate="")
        made = {"n": 0}

        def on_event(kind, **data):
            if kind == "start":
                bar.update(task, total=data["total"], completed=data["skipped"])
            elif kind == "item":
                bar.advance(task)
                if data["status"] == "done":
                    made["n"] += 1
                    bar.update(task, rate=f"{made['n'] / (bar.tasks[task].elapsed or 1e-9):.2f} items/s")
                elif data["status"] == "failed" and console.is_terminal:  # a log gets them after the summary
                    console.print(f"[red]failed:[/] line {data['line']}: {escape(data['reason'])}", highlight=False)

        try:
            summary = run(input, output, settings, on_event)
        except BaseException:
            bar.live.transient = True  # the error is the one line; no half-drawn bars
            raise

    table = Table(title="teach dcr", show_header=False)
    table.add_row("items", f"{summary.done} done, {summary.skipped} already done, {len(summary.failed)} failed")
    table.add_row("reached the threshold", f"{summary.passed}/{summary.done} (>= {settings.threshold})")
    table.add_row("mean score", f"{summary.mean_score:.2f}")
    table.add_row("iterations", f"{summary.iterations} (at most {settings.max_iterations} per item)")
    table.add_row("output", str(output))
    if summary.failed:
        table.add_row("failed items", f"{len(summary.failed)} -> {sidecar(output, 'rejects')}")
    table.add_row("time", f"{summary.seconds:.1f} s ({summary.concurrency} at once)")
    console.print(table)
    for line, reason in summary.failed:
        sys.stderr.write(f"failed: {input} line {line}: {reason}\n")
    return 1 if summary.failed else 0


app.command("adaptive", context_settings=common.HELP)(teach_adaptive.adaptive)
app.command("eval", context_settings=common.HELP)(teach_adaptive.evaluate)
