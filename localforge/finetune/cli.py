"""Rendering for `localforge finetune`: the plan as a table or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from localforge.errors import LocalforgeError


def build_plan(config_path: Path, overrides: list[str]):
    from localforge.backends import availability
    from localforge.finetune.config import load_config
    from localforge.finetune.data import load_data
    from localforge.finetune.planner import ModelShape, plan
    from localforge.hardware import HardwareProfile
    from localforge.models import ensure_hf, resolve

    cfg = load_config(config_path, overrides)
    data_path = Path(cfg.data)
    if not data_path.is_absolute() and not data_path.exists():  # relative to the config file
        data_path = Path(config_path).parent / data_path
    data = load_data(data_path)
    shape = ModelShape.from_hf_config(ensure_hf(resolve(cfg.model)))
    available = {name: availability(name)[0] for name in ("torch", "mlx")}
    return cfg, data, shape, plan(HardwareProfile.detect(), shape, cfg, available)


def run_finetune(config_path: Path, overrides: list[str], dry_run: bool, as_json: bool) -> None:
    cfg, data, shape, p = build_plan(config_path, overrides)
    if as_json:
        sys.stdout.write(json.dumps({**p.to_dict(), "model_params": shape.params,
                                     "data": {s: len(rows) for s, rows in data.splits.items()}}, indent=2) + "\n")
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"fine-tuning plan: {cfg.model} ({shape.params / 1e6:.0f}M parameters), {cfg.method}",
                  show_header=False)
        for key in ("backend", "device", "dtype", "batch_size", "grad_accum", "lora_rank", "lora_layers",
                    "gradient_checkpointing", "processes"):
            t.add_row(key, str(getattr(p, key)))
        t.add_row("predicted peak", f"{p.predicted_peak_bytes / 1024**3:.2f} GiB of a {p.memory_budget_bytes / 1024**3:.1f} GiB budget")
        t.add_row("data", ", ".join(f"{s}: {len(rows)} rows ({'/'.join(data.formats[s])})" for s, rows in data.splits.items()))
        console = Console()
        console.print(t)
        for reason in p.reasons:
            console.print(f"[dim]- {reason}[/]")
    if not dry_run:
        raise LocalforgeError("training is not in this release yet (the trainers are being built): "
                              "use --dry-run to see the plan")
