"""`localforge teach`: a teacher model improves answers for a student. `teach dcr` runs
Draft-Critique-Revise over a JSONL file; `teach generate` turns extracted records into training
pairs; `teach dataset` exports, signs and checks the pairs."""

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


GENERATE = "Pairs from records"


@app.command("generate", context_settings=common.HELP)
def generate(
    args: Annotated[list[str], typer.Argument(
        help="The JSONL file `localforge extract` wrote; key=value arguments override settings.",
        metavar="RECORDS.jsonl [KEY=VALUE]...")],
    output: Annotated[str, typer.Option("--output", "-o", help="The JSONL file of pairs to write (appended; resumable; its folder is created).")],
    config: tc.Config = None,
    pairs_per_record: Annotated[int | None, typer.Option("--pairs-per-record", "-n", min=1, max=8, help="Questions (pairs) per record (default 1).", rich_help_panel=GENERATE)] = None,
    grounding: Annotated[str | None, typer.Option("--grounding", help="The weakest grounding a value may have to be used: exact, normalized or fuzzy (the default).", rich_help_panel=GENERATE)] = None,
    judge: Annotated[bool | None, typer.Option("--judge/--no-judge", help="The teacher scores each pair against the source passages (default on): quality and feedback.", rich_help_panel=GENERATE)] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", min=1, help="Records in flight at once (default: the teacher server's parallel requests; 1 in-process).", rich_help_panel=GENERATE)] = None,
    cache: Annotated[bool | None, typer.Option("--cache/--no-cache", help="Reuse answers from the call cache (default on).", rich_help_panel=GENERATE)] = None,
    teacher_backend: tc.TeacherBackend = None,
    teacher_model: tc.TeacherModel = None,
    teacher_base_url: tc.TeacherBaseUrl = None,
) -> None:
    """Turn extracted records into training pairs: the teacher asks about each record's grounded values and answers from them.

    Per record the values grounded in the source (at least --grounding; re-checked against the document when it is still there) are the facts: the teacher writes questions whose answer is those facts, and answers each; an answer must state every value as written and no ungrounded one (else it is re-asked, and at last written from the values). With --judge the teacher scores each pair against the source passages. Each pair names, for every value it uses, the record id, the document's sha256, the page and the character span.

    Settings come from --config FILE, then KEY=VALUE arguments (context_chars=600), then flags. Re-running skips finished records and retries failed ones; exit code 1 when a record failed (each is in OUT.rejects.jsonl with its reason). `localforge teach dataset export` turns the pairs into training rows.
    """
    from localforge.errors import UsageError
    from localforge.teach.generate import check, load_generate_settings, run

    overrides, paths = common.split_args(args)
    if len(paths) != 1:
        raise UsageError("give one JSONL file of records, e.g. `localforge teach generate records.jsonl -o pairs.jsonl`"
                         if not paths else f"give one JSONL file of records, got {len(paths)}: {' '.join(paths)}")
    if grounding is not None and grounding not in ("exact", "normalized", "fuzzy"):
        raise UsageError(f"--grounding {grounding!r}: choose exact, normalized or fuzzy")
    flags = {"pairs_per_record": ("--pairs-per-record", pairs_per_record), "grounding": ("--grounding", grounding),
             "judge": ("--judge", judge), "concurrency": ("--concurrency", concurrency), "cache": ("--cache", cache),
             **tc.role_flags(teacher_backend, teacher_model, teacher_base_url)}
    settings = load_generate_settings(config, overrides, flags)
    prepared = check(paths[0], output, settings)  # records, sources and -o, before the bar: one line, no files
    common.engine_note(settings.teacher.backend)
    input, out = Path(paths[0]), Path(output)
    summary = tc.with_progress(lambda on_event: run(input, out, settings, on_event, prepared=prepared), "records")
    table = tc.summary_table("teach generate", summary, "records")
    table.add_row("pairs", f"{summary.pairs} ({summary.by_values} answers written from the values)")
    if summary.mean_quality is not None:
        table.add_row("mean quality", f"{summary.mean_quality:.2f} ({summary.scored} scored)")
    if summary.unused:
        lines = ", ".join(str(n) for n, _ in summary.unused[:8]) + (" ..." if len(summary.unused) > 8 else "")
        table.add_row("not used", f"{len(summary.unused)} records without a usable grounded value (lines {lines})")
    if summary.unfinished:
        table.add_row("left for later", f"{summary.unfinished} records of documents extract has not finished")
    if summary.unchecked:
        table.add_row("spans not re-checked", f"{summary.unchecked} records whose document is gone or changed")
    tc.finish(table, summary, input, out, "records")


app.command("adaptive", context_settings=common.HELP)(teach_adaptive.adaptive)
app.command("eval", context_settings=common.HELP)(teach_adaptive.evaluate)
