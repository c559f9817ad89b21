"""bf16 autocast against fp32 on this CPU: the same LoRA run twice, side by side in one run.

``localforge finetune --backend torch`` trains the bundled SmolLM2-135M with LoRA (rank 8,
alpha 16, q_proj + v_proj), the same rows (prompt/completion, every row cut to exactly
``--seq`` tokens, so no padding), batch ``--batch``, grad_accum 1, constant learning rate, for
``--steps`` steps: once with ``dtype: fp32`` and once with ``dtype: bf16`` (matmuls in bf16 under
``torch.autocast``, the adapter and its Adam states in fp32, the frozen base held in bf16), which
the planner picks by itself on a CPU with bf16 instructions (AMX-BF16 or AVX512-BF16).

Printed and written as JSON:

- tokens/s of each (the median step after the first) and their ratio;
- the loss curves: the largest relative difference of any step's loss, and of the mean loss
  over the last 10 steps (goal: within 1%);
- utilisation: training FLOP/s (the LoRA FLOPs per token of benchmarks/finetune.py) over the
  best rate of a large matmul measured in the same run on the same thread count, in bf16 for the
  bf16 run and fp32 for the fp32 run (goal for bf16: >= 80%).

The runs alternate over ``--rounds``; a CPU without bf16 instructions runs bf16 emulated and
slow (the table says which this one is).

    python benchmarks/precision.py [--steps 100] [--seq 128] [--batch 4] [--threads 1] [--rounds 1]
                                   [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # finetune.py: data, child processes

DTYPES = ("fp32", "bf16")


def matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> dict[str, float]:
    """The best FLOP/s of an n x n matmul in fp32 and in bf16, in a child process on ``threads`` threads."""
    import subprocess

    from finetune import child_env

    code = f"""
import json, time, torch
torch.set_num_threads({threads})
out = {{}}
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    a, b = torch.randn({n}, {n}, dtype=dtype), torch.randn({n}, {n}, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range({reps}):
        t0 = time.perf_counter(); a @ b; best = max(best, 2 * {n}**3 / (time.perf_counter() - t0))
    out[name] = best
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(threads),
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(dtype: str, s: dict, data: Path, work: Path, tag: str) -> dict:
    from finetune import child_env, localforge_config, run_process

    out = work / f"run-{tag}"
    cfg = localforge_config(work / f"{tag}.yaml", data, out, s, "torch", dtype=dtype, packing=False)
    cmd = [sys.executable, "-m", "localforge", "finetune", str(cfg), "--backend", "torch", "--no-progress"]
    proc = run_process(cmd, child_env(s["threads"]), work / f"{tag}.log")
    if proc["rc"] != 0:
        tail = "\n".join((work / f"{tag}.log").read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"{dtype} run failed (exit {proc['rc']}):\n{tail}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps = [x for x in steps if "loss" in x]
    manifest = json.loads((out / "manifest.json").read_text())
    return {"losses": [x["loss"] for x in steps], "rates": [x["tokens"] / x["seconds"] for x in steps[1:]],
            "plan_dtype": manifest["plan"]["dtype"], "peak_rss_bytes": proc["peak_rss_bytes"],
            "wall_s": round(proc["wall_s"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="threads for every run (see benchmarks/finetune.py)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, run folders)")
    ap.add_argument("--out", default="benchmarks/results/precision.json")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seq, args.batch = 12, 64, 2

    from finetune import LR, finish, flops_per_token, machine, write_data

    from localforge.backends import ensure_hf
    from localforge.hardware import HardwareProfile
    from localforge.models import resolve

    profile = HardwareProfile.detect()
    model_path = ensure_hf(resolve("smollm2-135m"))
    work = Path(tempfile.mkdtemp(prefix="lf-bench-precision-"))
    data = write_data(work / "data", model_path, args.seq, rows=max(64, args.steps * args.batch // 4))
    s = {"steps": args.steps, "seq": args.seq, "batch": args.batch, "threads": args.threads}
    began = time.perf_counter()
    peaks = [matmul_peak(args.threads)]
    runs: dict[str, list[dict]] = {d: [] for d in DTYPES}
    for r in range(args.rounds):
        for dtype in DTYPES if r % 2 == 0 else DTYPES[::-1]:
            res = run(dtype, s, data, work, f"{dtype}-{r}")
            runs[dtype].append(res)
            print(f"round {r + 1}/{args.rounds} {dtype}: {statistics.median(res['rates']):.1f} tok/s, final loss "
                  f"{res['losses'][-1]:.4f}", file=sys.stderr, flush=True)
    peaks.append(matmul_peak(args.threads))
    elapsed = time.perf_counter() - began

    peak = {d: max(p[d] for p in peaks) for d in DTYPES}
    fpt = flops_per_token(model_path, args.seq)["total"]
    rows = {}
    for d in DTYPES:
        tps = statistics.median(x for res in runs[d] for x in res["rates"])
        rows[d] = {"tokens_per_s": round(tps, 2), "train_gflops": round(tps * fpt / 1e9, 2),
                   "matmul_peak_gflops": round(peak[d] / 1e9, 2), "utilisation": round(tps * fpt / peak[d], 4),
                   "final_loss": runs[d][0]["losses"][-1], "losses": runs[d][0]["losses"],
                   "peak_rss_bytes": max(x["peak_rss_bytes"] for x in runs[d]), "runs": runs[d]}
    a, b = rows["fp32"]["losses"], rows["bf16"]["losses"]
    step_diff = max(abs(y - x) / x for x, y in zip(a, b, strict=True))
    tail = min(10, len(a))
    tail_diff = abs(statistics.fmean(b[-tail:]) - statistics.fmean(a[-tail:])) / statistics.fmean(a[-tail:])
    speedup = rows["bf16"]["tokens_per_s"] / rows["fp32"]["tokens_per_s"]
    goals = {
        "loss_last10_within_1pct": {"value": round(tail_diff, 5), "goal": "<= 0.01", "met": tail_diff <= 0.01},
        "loss_every_step_within_1pct": {"value": round(step_diff, 5), "goal": "<= 0.01 (reference)",
                                        "met": step_diff <= 0.01},
        "bf16_vs_fp32_tokens_per_s": {"ratio": round(speedup, 3), "goal": "> 1 (1.78 measured before)",
                                      "met": speedup > 1},
        "bf16_utilisation_of_bf16_matmul_peak": {"value": rows["bf16"]["utilisation"], "goal": ">= 0.80",
                                                 "met": rows["bf16"]["utilisation"] >= 0.8},
        "planner_picks_bf16_here": {"value": _planned_dtype(model_path, data), "goal": "bf16 where cpu_bf16",
                                    "met": (_planned_dtype(model_path, data) == "bf16") == profile.cpu_bf16},
    }

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    table = Table(title=f"LoRA on SmolLM2-135M, torch on {profile.chip} (bf16 instructions: "
                        f"{'yes' if profile.cpu_bf16 else 'no'}), batch {args.batch} x {args.seq} tokens, "
                        f"{args.steps} steps, {args.threads} thread(s)")
    for col in ("dtype", "tok/s (median step)", "train GFLOP/s", "matmul peak GFLOP/s (same dtype)", "utilisation",
                "final loss", "peak RSS GiB"):
        table.add_column(col)
    for d, r in rows.items():
        table.add_row(d, f"{r['tokens_per_s']:.1f}", f"{r['train_gflops']:.1f}", f"{r['matmul_peak_gflops']:.1f}",
                      f"{r['utilisation']:.1%}", f"{r['final_loss']:.4f}", f"{r['peak_rss_bytes'] / 2**30:.2f}")
    console.print(table)
    console.print(f"bf16 / fp32 tokens/s: {speedup:.2f}x. Loss: mean of the last {tail} steps differs by "
                  f"{tail_diff:.3%} (goal <= 1%: {'met' if goals['loss_last10_within_1pct']['met'] else 'MISSED'}); "
                  f"the largest difference at any step {step_diff:.3%}. bf16 utilisation "
                  f"{rows['bf16']['utilisation']:.1%} of the bf16 matmul peak (goal >= 80%: "
                  f"{'met' if goals['bf16_utilisation_of_bf16_matmul_peak']['met'] else 'MISSED'}). {elapsed:.0f} s.")
    result = {"machine": {**machine(), "cpu_bf16": profile.cpu_bf16, "chip": profile.chip},
              "settings": {**s, "lr": LR, "rounds": args.rounds, "method": "lora", "rank": 8,
                           "targets": ["q_proj", "v_proj"]},
              "rows": rows, "goals": goals, "elapsed_s": round(elapsed, 1)}
    finish(result, Path(args.out), work, args.keep)


def _planned_dtype(model_path: str, data: Path) -> str:
    """What ``dtype: auto`` plans on this machine for the benchmark's run."""
    from localforge.finetune.config import FinetuneConfig
    from localforge.finetune.planner import ModelShape, plan
    from localforge.hardware import HardwareProfile

    cfg = FinetuneConfig(model=model_path, data=str(data / "train.jsonl"), backend="torch")
    return plan(HardwareProfile.detect(), ModelShape.from_hf_config(model_path), cfg, {"torch": True}).dtype


if __name__ == "__main__":
    main()
