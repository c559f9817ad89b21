"""`localforge run PIPELINE.yaml`: documents to a fine-tuned, evaluated, exported model, one bar per
stage and a summary table; `localforge run trace RUN_DIR ROW`: a training row back to its source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from localforge.commands import common

app = common.group("Documents to a fine-tuned, evaluated, exported model in one resumable run; trace a row back to its source.")


@common.default(app, allow_extra_args=True)
def run(
    ctx: typer.Context,
    pipeline: Annotated[Path, typer.Argument(help="The pipeline file (YAML); any key can be overridden as key=value (finetune.steps=40).")],
    start: Annotated[str | None, typer.Option("--from", help="Begin at this stage (extract, generate, dcr, dataset, finetune, eval, export): the stages before it are taken as they are, it and the later ones run again.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Stop after this stage.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", "-b", help="The student's engine for training and eval (auto, or one that trains: see `localforge doctor`); overrides the file's backend.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bars.")] = True,
) -> None:
    """Run the pipeline extract -> generate -> (dcr) -> dataset -> finetune -> eval -> export.

    Each stage reads the previous stage's files and is skipped when its settings and its inputs are unchanged; a run killed at any point continues where it stopped when run again. Exit 1 when a stage failed or some of its items did (a bad document: the rest goes on).

    `localforge run trace RUN_DIR ROW` walks a training row back to its source span.
    """
    from localforge.pipeline.run import check_stage, prepare

    check_stage(start, "--from")
    check_stage(until, "--until")
    flags = {"backend": ("--backend", backend), "finetune.backend": ("--backend", backend)}
    prepared = prepare(pipeline, list(ctx.args), flags)
    manifest = _run(pipeline, prepared, start, until, progress)
    _summary(manifest)
    raise typer.Exit(1 if manifest.get("status") == "completed with failures" else 0)


def _train(run_dir: Path, processes: int, on_event) -> dict:
    """The finetune stage's training: in this process, or in several through accelerate."""
    if processes > 1:
        from localforge.finetune.launch import Launch, launch_processes
        from localforge.finetune.run import RunDir

        launch_processes(run_dir, Launch(processes=processes), "localforge.commands.worker", True)
        return json.loads(RunDir(run_dir).manifest.read_text())
    from localforge.finetune.run import train

    return train(run_dir, on_event=on_event)


def _run(pipeline: Path, prepared, start: str | None, until: str | None, progress: bool) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from localforge.pipeline.run import run
    from localforge.pipeline.settings import STAGES

    console = common.console(stderr=True)
    bar = Progress(TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=False,
                   disable=not progress or not console.is_terminal)
    tasks: dict[str, int] = {}

    def on_event(kind: str, **data) -> None:
        stage = data.get("stage")
        if kind == "stage":
            n = f"[{STAGES.index(stage) + 1}/{len(STAGES)}]"
            if data["status"] == "run":
                tasks[stage] = bar.add_task(stage, total=None, info="")
                if bar.disable:
                    console.print(f"{n} {stage}: running", markup=False)
            elif data["status"] == "done":
                if stage in tasks:
                    task = bar.tasks[tasks[stage]]
                    bar.update(tasks[stage], total=task.total or task.completed or 1,
                               completed=task.total or task.completed or 1, info="done")
                if bar.disable:
                    console.print(f"{n} {stage}: done", markup=False)
            else:
                console.print(f"{n} {stage}: " + {"skip": f"skipped ({data.get('reason')})", "off": "off"}[data["status"]],
                              markup=False, style="dim")
        elif kind == "progress" and stage in tasks:
            task = tasks[stage]
            if "total" in data:
                bar.update(task, total=data["total"])
            if "grow" in data:
                bar.update(task, total=(bar.tasks[task].total or 0) + data["grow"])
            for key in ("completed", "advance", "info"):
                if key in data:
                    bar.update(task, **{key: data[key]})
        elif kind == "failed":
            console.print(f"[red]failed[/] ({stage}): {data['reason']}", highlight=False)

    with bar:
        try:
            return run(pipeline, start=start, until=until, on_event=on_event, train=_train, prepared=prepared)
        except BaseException:
            bar.live.transient = True
            raise


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _summary(manifest: dict) -> None:
    """The table: documents, records, grounded share, pairs kept, loss, eval, where every output is."""
    from rich.table import Table

    st = {name: rec.get("summary") or {} for name, rec in manifest["stages"].items()}
    t = Table(title=f"localforge run: {manifest['status']}", show_header=False)
    ex = st.get("extract", {})
    if ex:
        t.add_row("documents", f"{ex['done']} of {ex['documents']} extracted, {ex['failed']} failed")
        share = f" ({ex['grounded'] / ex['values']:.0%} of their values grounded)" if ex.get("values") else ""
        t.add_row("records", f"{ex['records']}{share} -> {ex['records_file']}")
        t.add_row("review", ex["review"])
    ge = st.get("generate", {})
    if ge:
        t.add_row("pairs", f"{ge['pairs']} from {ge['records']} records ({ge['by_values']} answers from the values, "
                           f"mean quality {_fmt(ge.get('mean_quality'), '.2f')}) -> {ge['pairs_file']}")
    if st.get("dcr"):
        t.add_row("improved", f"{st['dcr']['improved']} -> {st['dcr']['improved_file']}")
    ds = st.get("dataset", {})
    if ds:
        t.add_row("dataset", f"{ds['kept']} of {ds['pairs_in']} pairs kept: {ds['train']} train, {ds['valid']} valid, "
                             f"{ds['test']} held out{', signed' if ds.get('signed_by') else ''} -> {ds['folder']}")
    ft = st.get("finetune", {})
    if ft:
        t.add_row("train loss", f"{_fmt(ft.get('first_loss'))} -> {_fmt(ft.get('last_loss'))} over {ft.get('steps')} steps "
                                f"on {ft.get('backend')} (eval loss {_fmt(ft.get('eval_loss'))})")
        t.add_row(ft.get("kind", "adapter"), str(ft.get("output")))
        t.add_row("loss curve", ft["loss_png"])
    ev = st.get("eval", {})
    if ev:
        b, a = ev["base"], ev["tuned"]
        t.add_row("eval held-out", f"values stated {_fmt(b['value_recall'], '.0%')} without, {_fmt(a['value_recall'], '.0%')} "
                                   f"with; all values {_fmt(b['exact'], '.0%')} -> {_fmt(a['exact'], '.0%')} ({b['heldout']} pairs)")
        t.add_row("eval general", f"{_fmt(b['general_accuracy'], '.0%')} without, {_fmt(a['general_accuracy'], '.0%')} with "
                                  f"({b['general']} questions; forgetting {_fmt(ev.get('forgetting'), '+.0%')})")
    exp = st.get("export", {})
    if exp:
        t.add_row("export", f"{exp['to']}: {exp['path']}" + (f"  (then: {exp['command']})" if exp.get("command") else ""))
    t.add_row("manifest", str(Path(manifest["settings"]).with_name("manifest.json")))
    common.console(stderr=True).print(t)
    if manifest.get("reason"):
        common.console(stderr=True).print(f"note: {manifest['reason']}", markup=False)
    common.out(str(Path(manifest["settings"]).parent))


@app.command("trace", context_settings=common.HELP)
def trace(
    run_dir: Annotated[Path, typer.Argument(help="A pipeline's output_dir.")],
    row: Annotated[str, typer.Argument(help="A training row: N (line N of dataset/train.jsonl), SPLIT:N (train, valid, test) or a pair id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the chain as JSON.")] = False,
) -> None:
    """Print a training row's chain: the row, its pair, and for each value the record, the source
    document (and whether it still has the same sha256), the page, the character span and its text."""
    from localforge.pipeline.trace import lines
    from localforge.pipeline.trace import trace as chain_of

    chain = chain_of(run_dir, row)
    if as_json:
        common.out(json.dumps(chain, indent=2, ensure_ascii=False))
    else:
        for line in lines(chain):
            common.out(line)
