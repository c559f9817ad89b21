"""Rendering for `localforge finetune`: the plan, the run (in this process or through accelerate), the summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console

from localforge.finetune.launch import Launch


def _plan_table(cfg, shape_params: int, p, data, stderr: bool = False) -> None:
    from rich.table import Table

    t = Table(title=f"fine-tuning plan: {cfg.model} ({shape_params / 1e6:.0f}M parameters), {cfg.method}",
              show_header=False)
    for key in ("backend", "device", "dtype", "batch_size", "grad_accum", "lora_rank", "lora_layers",
                "gradient_checkpointing", "processes"):
        t.add_row(key, str(getattr(p, key)))
    t.add_row("predicted peak", f"{p.predicted_peak_bytes / 1024**3:.2f} GiB of a {p.memory_budget_bytes / 1024**3:.1f} GiB budget")
    t.add_row("data", ", ".join(f"{s}: {len(rows)} rows ({'/'.join(data.formats[s])})" for s, rows in data.splits.items()))
    console = Console(stderr=stderr)
    console.print(t)
    for reason in p.reasons:
        console.print(f"[dim]- {reason}[/]")


def run_finetune(config_path: Path, overrides: list[str], dry_run: bool, as_json: bool,
                 launch: Launch | None = None, progress: bool = True) -> None:
    from localforge.finetune.run import prepare, start

    if launch and launch.processes:
        overrides = [*overrides, f"num_processes={launch.processes}"]
    if dry_run:
        cfg, data, _, shape, p = prepare(config_path, overrides)
        if as_json:
            sys.stdout.write(json.dumps({**p.to_dict(), "model_params": shape.params,
                                         "data": {s: len(rows) for s, rows in data.splits.items()}}, indent=2) + "\n")
        else:
            _plan_table(cfg, shape.params, p, data)
        return
    run, prepared = start(config_path, overrides)
    _plan_table(prepared.cfg, prepared.shape.params, prepared.plan, prepared.data, stderr=True)
    _train(run.path, prepared.plan.processes, launch, progress)


def resume_finetune(run_dir: Path, overrides: list[str], launch: Launch | None = None, progress: bool = True) -> None:
    from localforge.finetune.run import reopen

    run, p = reopen(run_dir, overrides)
    latest = run.latest()
    Console(stderr=True).print(f"resuming {run.path} from {latest.name if latest else 'the start'}")
    _train(run.path, p.processes, launch, progress)


def _train(run_dir: Path, processes: int, launch: Launch | None, progress: bool) -> None:
    from localforge.finetune.launch import launch as launch_processes
    from localforge.finetune.run import RunDir, train

    if processes > 1:
        spec = launch or Launch(processes=processes)
        spec.processes = processes
        launch_processes(run_dir, spec, progress)
        manifest = json.loads(RunDir(run_dir).manifest.read_text())
    else:
        manifest = train(run_dir, progress=progress)
    _summary(manifest)


def _summary(manifest: dict) -> None:
    m = manifest["metrics"]
    parts = [f"{m.get('steps', 0)} steps", f"train loss {m['final_train_loss']:.4f}" if "final_train_loss" in m else "",
             f"eval loss {m['final_eval_loss']:.4f}" if "final_eval_loss" in m else "",
             f"{m['tokens_per_second']:.0f} tok/s" if m.get("tokens_per_second") else "",
             f"peak RSS {m['peak_rss_bytes'] / 1024**3:.2f} GiB"]
    console = Console(stderr=True)
    console.print("done: " + ", ".join(p for p in parts if p))
    if manifest.get("adapter"):
        console.print(f"adapter ({manifest['adapter']['format']}): {manifest['adapter']['path']}")
    run = Path(manifest["run_dir"])
    console.print(f"manifest: {run / 'manifest.json'}  loss curve: {run / 'loss.png'}")
    sys.stdout.write(str(manifest["adapter"]["path"] if manifest.get("adapter") else run) + "\n")
