"""`localforge finetune`: plan and train from one config; `localforge finetune resume`: continue a
stopped run. Renders the plan, a progress bar from the driver's events, and a summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from localforge.commands import common

app = common.group("Fine-tune (LoRA, DoRA, full, GRPO) from one config on any engine that trains; resume runs.")
PROCESSES = "Several processes (accelerate)"


@common.default(app, allow_extra_args=True)
def finetune(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="The YAML config; any key can be overridden as key=value.")],
    backend: Annotated[str | None, typer.Option("--backend", "-b", help="auto, or a backend that trains (see `localforge doctor`); overrides the config.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the config against the model and this machine, print the plan; do not train.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start even when the predicted peak memory exceeds this machine's budget (without it such a start is refused, naming batch_size and max_seq_length).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print the plan as JSON.")] = False,
    num_processes: Annotated[int | None, typer.Option("--num-processes", help="Training processes in all (accelerate launch); default: one per GPU.", rich_help_panel=PROCESSES)] = None,
    num_machines: Annotated[int, typer.Option("--num-machines", rich_help_panel=PROCESSES)] = 1,
    machine_rank: Annotated[int, typer.Option("--machine-rank", rich_help_panel=PROCESSES)] = 0,
    main_process_ip: Annotated[str | None, typer.Option("--main-process-ip", rich_help_panel=PROCESSES)] = None,
    main_process_port: Annotated[int | None, typer.Option("--main-process-port", rich_help_panel=PROCESSES)] = None,
    accelerate_config: Annotated[str | None, typer.Option("--accelerate-config", help="An `accelerate config` file (FSDP, DeepSpeed, multi-node).", rich_help_panel=PROCESSES)] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
) -> None:
    """LoRA/DoRA/full fine-tuning or GRPO from one config, planned for this machine.

    Every setting is checked (ranges, LoRA targets and layers against the model, max_seq_length
    against its context, the predicted peak against the memory budget) before anything is written;
    --dry-run runs the same checks.

    `localforge finetune resume RUN_DIR` (then any key=value overrides) continues a stopped run exactly.
    """
    from localforge.finetune.launch import Launch
    from localforge.finetune.run import prepare, start

    _check_launch(num_processes, num_machines, machine_rank, main_process_port)
    flags = {"backend": ("--backend", backend), "num_processes": ("--num-processes", num_processes)}
    launch = Launch(num_processes or 0, num_machines, machine_rank, main_process_ip, main_process_port,
                    accelerate_config)
    if dry_run:
        cfg, data, _, shape, p = prepare(config, list(ctx.args), flags, force=force)
        if as_json:
            common.out(json.dumps({**p.to_dict(), "model_params": shape.params,
                                   "data": {s: len(rows) for s, rows in data.splits.items()}}, indent=2))
        else:
            _plan_table(cfg, shape.params, p, data)
        return
    run, prepared = start(config, list(ctx.args), flags, force=force)
    common.engine_note(prepared.plan.backend)
    try:
        _plan_table(prepared.cfg, prepared.shape.params, prepared.plan, prepared.data, stderr=True)
        _train(run.path, prepared.plan.processes, launch, progress)
    except BaseException:
        if not run.started():  # a start that never trained leaves no folder to refuse the next one
            run.discard()
        raise


def _check_launch(num_processes: int | None, num_machines: int, machine_rank: int, port: int | None) -> None:
    """The launch flags' ranges, as usage errors (exit 2), before anything is read or written."""
    from localforge.errors import UsageError

    if num_processes is not None and num_processes < 1:
        raise UsageError(f"--num-processes: expected 1 or more, got {num_processes}")
    if num_machines < 1:
        raise UsageError(f"--num-machines: expected 1 or more, got {num_machines}")
    if not 0 <= machine_rank < num_machines:
        raise UsageError(f"--machine-rank: expected 0 to {num_machines - 1} (--num-machines {num_machines}), "
                         f"got {machine_rank}")
    if num_processes is not None and num_processes < num_machines:
        raise UsageError(f"--num-processes: {num_processes} processes over {num_machines} machines: give at least "
                         f"one per machine")
    if port is not None and not 1 <= port <= 65535:
        raise UsageError(f"--main-process-port: expected 1 to 65535, got {port}")


@app.command("resume", context_settings={**common.HELP, "allow_extra_args": True})
def resume(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="The output_dir of a stopped run.")],
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
) -> None:
    """Continue a stopped run from its newest checkpoint (adapter, optimizer, schedule, data order, RNG)."""

    from localforge.finetune.run import reopen

    run, p = reopen(run_dir, list(ctx.args))
    latest = run.latest()
    common.console(stderr=True).print(f"resuming {run.path} from {latest.name if latest else 'the start'}")
    _train(run.path, p.processes, None, progress)


def _plan_table(cfg, shape_params: int, p, data, stderr: bool = False) -> None:
    from rich.table import Table

    t = Table(title=f"fine-tuning plan: {cfg.model} ({shape_params / 1e6:.0f}M parameters), {cfg.method}",
              show_header=False)
    for key in ("backend", "device", "dtype", "batch_size", "grad_accum", "lora_rank", "lora_layers",
                "gradient_checkpointing", "packing", "kernels", "compile", "processes", "num_generations",
                "max_completion_length"):
        if getattr(p, key) is not None or key in ("lora_rank", "lora_layers"):
            t.add_row(key, str(getattr(p, key)))
    t.add_row("predicted peak", f"{p.predicted_peak_bytes / 1024**3:.2f} GiB of a {p.memory_budget_bytes / 1024**3:.1f} GiB budget")
    t.add_row("data", ", ".join(f"{s}: {len(rows)} rows ({'/'.join(data.formats[s])})" for s, rows in data.splits.items()))
    console = common.console(stderr=stderr)
    console.print(t)
    for reason in p.reasons:
        console.print(f"[dim]- {reason}[/]")


def _train(run_dir: Path, processes: int, launch, progress: bool) -> None:
    from localforge.finetune.launch import Launch, launch_processes
    from localforge.finetune.run import RunDir

    if processes > 1:
        spec = launch or Launch(processes=processes)
        spec.processes = processes
        launch_processes(run_dir, spec, "localforge.commands.worker", progress)
        manifest = json.loads(RunDir(run_dir).manifest.read_text())
    else:
        manifest = train_with_progress(run_dir, progress)
    _summary(manifest)


def train_with_progress(run_dir: Path | str, progress: bool = True) -> dict:
    """``finetune.run.train`` with a rich progress bar drawn from its events (on the main process)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from localforge.finetune.run import train

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                   TextColumn("eval {task.fields[eval]}"), TimeRemainingColumn(), disable=not progress,
                   console=common.console(stderr=True), transient=False)
    task = None

    def on_event(kind: str, **data) -> None:
        nonlocal task
        if kind == "start":
            task = bar.add_task("train", total=data["total"], completed=data["step"], loss="-", tps="-", eval="-")
        elif kind == "step":
            bar.update(task, completed=data["step"], loss=f"{data['loss']:.3f}", tps=f"{data['tokens_per_second']:.0f}",
                       **({"eval": f"reward {data['reward']:.3f}"} if "reward" in data else {}))
        elif kind == "eval":
            bar.update(task, eval=f"{data['eval_loss']:.3f}")

    with bar:
        return train(run_dir, on_event=on_event)


def _summary(manifest: dict) -> None:

    m = manifest["metrics"]
    parts = [f"{m.get('steps', 0)} steps", f"train loss {m['final_train_loss']:.4f}" if "final_train_loss" in m else "",
             f"eval loss {m['final_eval_loss']:.4f}" if "final_eval_loss" in m else "",
             f"{m['tokens_per_second']:.0f} tok/s" if m.get("tokens_per_second") else "",
             f"peak RSS {m['peak_rss_bytes'] / 1024**3:.2f} GiB"]
    console = common.console(stderr=True)
    console.print("done: " + ", ".join(p for p in parts if p))
    output = manifest.get("output") or manifest.get("adapter")  # manifests before "output" named only adapters
    if output:
        if output.get("kind") == "model":
            console.print(f"model ({output['format']}): {output['path']}  (use it with --model {output['path']})",
                          markup=False)
        else:
            console.print(f"adapter ({output['format']}): {output['path']}  (use it with --adapter {output['path']})",
                          markup=False)
    run = Path(manifest["run_dir"])
    console.print(f"manifest: {run / 'manifest.json'}  loss curve: {run / 'loss.png'}")
    sys.stdout.write(str(output["path"] if output else run) + "\n")
