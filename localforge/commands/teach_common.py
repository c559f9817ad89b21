"""What the teach commands share: the teacher and student options, the settings flags they make,
the progress bar, and the closing summary (one `failed:` line per failed item, exit code 1)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from localforge.commands import common

TEACHER = "Teacher"
STUDENT = "Student"

Config = Annotated[Path | None, typer.Option("--config", "-c", help="A YAML file of teach settings (teacher:, student:, and the keys below).")]
TeacherBackend = Annotated[str | None, typer.Option("--teacher-backend", callback=common.known_backend, rich_help_panel=TEACHER, help="auto (the default), or a backend from `localforge doctor`.")]
TeacherModel = Annotated[str | None, typer.Option("--teacher-model", rich_help_panel=TEACHER, help="The teacher model (default: the embedded default model).")]
TeacherBaseUrl = Annotated[str | None, typer.Option("--teacher-base-url", rich_help_panel=TEACHER, help="The teacher's server URL, for server backends.")]
StudentBackend = Annotated[str | None, typer.Option("--student-backend", callback=common.known_backend, rich_help_panel=STUDENT, help="auto (the default), or a backend from `localforge doctor`.")]
StudentModel = Annotated[str | None, typer.Option("--student-model", rich_help_panel=STUDENT, help="The student model (default: the embedded default model).")]
StudentBaseUrl = Annotated[str | None, typer.Option("--student-base-url", rich_help_panel=STUDENT, help="The student's server URL, for server backends.")]


def role_flags(teacher_backend, teacher_model, teacher_base_url, student_backend=None, student_model=None,
               student_base_url=None) -> dict:
    """The teacher and student options as settings flags on dotted keys (see ``settings``)."""
    return {"teacher.backend": ("--teacher-backend", teacher_backend),
            "teacher.model": ("--teacher-model", teacher_model),
            "teacher.base_url": ("--teacher-base-url", teacher_base_url),
            "student.backend": ("--student-backend", student_backend),
            "student.model": ("--student-model", student_model),
            "student.base_url": ("--student-base-url", student_base_url)}


def with_progress(run, noun: str):
    """``run(on_event)`` under a progress bar of ``noun`` (items, questions) on a terminal; a log
    gets the summary alone, and a failure leaves no half-drawn bar."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = common.console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
                  transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(noun, total=None, rate="")
        made = {"n": 0}

        def on_event(kind, **data):
            if kind == "start":
                bar.update(task, total=data["total"], completed=data["skipped"])
            elif kind == "item":
                bar.advance(task)
                if data["status"] == "done":
                    made["n"] += 1
                    bar.update(task, rate=f"{made['n'] / (bar.tasks[task].elapsed or 1e-9):.2f} {noun}/s")
                elif data["status"] == "failed" and console.is_terminal:  # a log gets them after the summary
                    console.print(f"[red]failed:[/] line {data['line']}: {escape(data['reason'])}", highlight=False)

        try:
            return run(on_event)
        except BaseException:
            bar.live.transient = True  # the error is the one line
            raise


def summary_table(title: str, summary, noun: str):
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_row(noun, f"{summary.done} done, {summary.skipped} already done, {len(summary.failed)} failed")
    return table


def finish(table, summary, input: Path, output: Path, noun: str, show_output: bool = True) -> None:
    """Print the summary and each failure once; exit 1 when an item failed."""
    from localforge.resumable import sidecar

    if show_output:
        table.add_row("output", str(output))
    if summary.failed:
        table.add_row(f"failed {noun}", f"{len(summary.failed)} -> {sidecar(output, 'rejects')}")
    table.add_row("time", f"{summary.seconds:.1f} s ({summary.concurrency} at once)")
    common.console(stderr=True).print(table)
    for line, reason in summary.failed:
        sys.stderr.write(f"failed: {input} line {line}: {reason}\n")
    raise typer.Exit(1 if summary.failed else 0)
