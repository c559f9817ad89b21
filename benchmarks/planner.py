"""The hardware planner on this machine: predicted against measured peak memory, auto batch against a sweep.

On the bundled SmolLM2-135M (or, with ``--shape``, a random-initialised model of a named shape
built on this machine: the way to run it on a GPU machine that cannot receive the bundled
model), LoRA (rank 8, q_proj + v_proj), grad_accum 1, and dtype and gradient checkpointing left
to the planner (bf16 on CUDA and on a CPU with bf16 instructions, else fp32), for each layout
of ``--layouts``:

- ``full``: rows of exactly ``--seq`` tokens (no padding, nothing to pack);
- ``packed``: short rows (an eighth to a half of ``--seq``), packed into rows of ``--seq``;
- ``padded``: the same short rows unpacked, each batch padded to its longest row's bucket
  (the planner sizes it by the longest row of the data);

and for each batch of the sweep (8, 16, 32, 64): the planner's ``predicted_peak_bytes`` from
``localforge finetune --dry-run --json``, then real runs of ``--steps`` steps through the CLI;
the measured peak is what the process holds (goal: within 10% of the prediction): on a CPU the
run's ``metrics.peak_rss_bytes``; on CUDA the GPU memory NVML saw the process hold
(``metrics.memory.nvml_used_bytes``, its CUDA context included, as the prediction's runtime
is), else torch's ``peak_reserved_bytes``; both CUDA figures and the peak allocated are in the
JSON. tokens/s is the median step after the first (from metrics.jsonl);
- ``batch_size=auto``: the batch the planner picks (from the dry run), then real runs; goal: the
  tokens/s of the batch it picks at least 90% of the best batch of the sweep, and no run out of
  memory. Auto resolves to one of the sweep's configurations (checked), so its runs and the
  sweep's runs of that batch are pooled; the auto runs alone are reported beside.

Every run passes ``--force``: the sweep measures batches whose predicted peak exceeds the budget
too (without it `finetune` refuses them before any work).

Rounds run every configuration in alternating order; tokens/s is the median step over all
rounds, the peak the highest. One thread per run by default on a CPU, as in
benchmarks/finetune.py: on a shared 2-core VM two threads collapse whenever another process
takes a core.

    python benchmarks/planner.py [--seq 128] [--batches 8,16,32,64] [--layouts packed,padded]
                                 [--steps 3] [--rounds 1] [--threads 1] [--quick]
    python benchmarks/planner.py --device cuda --shape llama-1b --tokenizer bpe   # seq 512, 5 steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # finetune.py: data, child processes

PLAN_KEYS = ("backend", "dtype", "batch_size", "grad_accum", "gradient_checkpointing", "lora_rank", "lora_layers")


def dry_run(cfg: Path, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "localforge", "finetune", str(cfg), "--dry-run", "--json", "--force"],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"dry run failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout)


GPU_MEMORY = ("peak_allocated_bytes", "peak_reserved_bytes", "nvml_used_bytes")  # the manifest's metrics.memory


def held(manifest: dict, memory: dict) -> tuple[int | None, str]:
    """What the run's process held at its peak, and where that figure comes from: on CUDA the GPU
    memory NVML saw it hold (else torch's reserved peak), on a CPU its peak RSS."""
    if manifest["plan"]["device"] == "cuda":
        for key in ("nvml_used_bytes", "peak_reserved_bytes"):
            if memory.get(key):
                return memory[key], key
        return None, "none"
    return manifest["metrics"]["peak_rss_bytes"], "peak_rss_bytes"


def real_run(cfg: Path, out: Path, env: dict, log: Path) -> dict:
    from finetune import run_process

    proc = run_process([sys.executable, "-m", "localforge", "finetune", str(cfg), "--backend", "torch", "--force",
                        "--no-progress"], env, log)
    result = {"rc": proc["rc"], "wall_s": round(proc["wall_s"], 1), "process_peak_rss_bytes": proc["peak_rss_bytes"]}
    if proc["rc"] != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
        killed = proc["rc"] in (-9, 137)
        return {**result, "status": "killed (out of memory?)" if killed else "failed", "error": tail}
    manifest = json.loads((out / "manifest.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps = [s for s in steps if "loss" in s]
    rates = [s["tokens"] / s["seconds"] for s in steps[1:]]  # step 1 is warm-up
    memory = manifest["metrics"].get("memory") or {}
    peak, source = held(manifest, memory)
    return {**result, "status": manifest["status"], "peak_bytes": peak, "peak_source": source,
            "peak_rss_bytes": manifest["metrics"]["peak_rss_bytes"], **{k: memory[k] for k in GPU_MEMORY if k in memory},
            "tokens_per_s": round(statistics.median(rates), 2), "step_rates": [round(r, 2) for r in rates],
            "plan": manifest["plan"]}


def summarise(plan: dict, runs: list[dict]) -> dict:
    ok = [x for x in runs if x["status"] == "completed"]
    row = {"batch": plan["batch_size"], "gradient_checkpointing": plan["gradient_checkpointing"],
           "dtype": plan["dtype"], "packing": plan.get("packing"), "predicted_peak_bytes": plan["predicted_peak_bytes"],
           "status": "completed" if len(ok) == len(runs) else next(x["status"] for x in runs if x not in ok),
           "runs": runs}
    if ok:
        row["tokens_per_s"] = round(statistics.median(v for x in ok for v in x["step_rates"]), 2)
        for key in ("peak_rss_bytes", *GPU_MEMORY):
            if all(x.get(key) for x in ok):
                row[key] = max(x[key] for x in ok)
        if all(x["peak_bytes"] for x in ok):
            row["peak_bytes"], row["peak_source"] = max(x["peak_bytes"] for x in ok), ok[0]["peak_source"]
            row["measured_over_predicted"] = round(row["peak_bytes"] / plan["predicted_peak_bytes"], 3)
            row["within_10pct"] = abs(row["measured_over_predicted"] - 1) <= 0.10
    return row


def short_rows(folder: Path, seq: int, n: int = 256) -> Path:
    """``folder/train.jsonl``: prompt/completion rows of an eighth to a half of ``seq`` words."""
    import random

    from finetune import WORDS

    rng = random.Random(1)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(n):
        words = rng.randint(max(2, seq // 8), max(3, seq // 2 - 8))
        rows.append({"prompt": "Write a note.", "completion": " " + " ".join(rng.choice(WORDS) for _ in range(words))})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: bf16 on the first GPU, the peak read off the GPU (default seq 512, 5 steps)")
    ap.add_argument("--shape", help="smollm2-135m, llama-1b or a folder with a config.json: a random model of that "
                                    "shape built here (default: the bundled model)")
    ap.add_argument("--tokenizer", default=None, help="with --shape: a tokenizer folder, or bpe (see benchmarks/shapes.py)")
    ap.add_argument("--seq", type=int, default=None, help="default 128, 512 on cuda")
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--layouts", default="packed,padded", help="comma-separated: full, packed, padded")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (the first is warm-up; default 3, 5 on cuda)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="threads for every run (default 1, 8 on cuda; see "
                                                               "benchmarks/finetune.py)")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, run folders)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/planner.json, planner-cuda.json on cuda")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    defaults = {"seq": 512, "steps": 5, "threads": 8} if cuda else {"seq": 128, "steps": 3, "threads": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.seq, args.batches, args.steps, args.rounds = 64, "2,4", 2, 1
    if args.out is None:
        args.out = f"benchmarks/results/planner{'-cuda' if cuda else ''}.json"

    from finetune import build_shape, child_env, localforge_config, write_data

    work = Path(tempfile.mkdtemp(prefix="lf-bench-planner-"))
    env = child_env(args.threads)
    env["CUDA_VISIBLE_DEVICES"] = "0" if cuda else ""  # one GPU, or none (a GPU machine's --device cpu)
    model_ref = model_path = None
    if args.shape:  # a random model of that shape, built on this machine (no weights travel)
        built = build_shape(work, args.shape, args.device, "bf16" if cuda else "fp32", args.tokenizer, args.threads)
        model_ref = model_path = built["model_path"]
        print(f"{args.shape}: {built.get('params', 0) / 1e6:.1f}M parameters, random, built on {args.device}",
              file=sys.stderr, flush=True)
    else:
        from localforge.backends import ensure_hf
        from localforge.models import resolve

        model_path = ensure_hf(resolve("smollm2-135m"))
    layouts = args.layouts.split(",")
    data = {"full": write_data(work / "data-full", model_path, args.seq)} if "full" in layouts else {}
    if {"packed", "padded"} & set(layouts):
        data["packed"] = data["padded"] = short_rows(work / "data-short", args.seq)
    began = time.perf_counter()

    def config(tag: str, layout: str, batch) -> tuple[Path, Path]:
        out = work / f"run-{tag}"
        s = {"steps": args.steps, "batch": batch, "seq": args.seq, "device": args.device}
        if model_ref:
            s["model_ref"] = model_ref
        return localforge_config(work / f"{tag}.yaml", data[layout], out, s, "torch", gradient_checkpointing="auto",
                                 dtype="auto", packing=layout == "packed"), out

    entries = [(f"{layout}-b{b}", layout, int(b)) for layout in layouts for b in args.batches.split(",")]
    entries.append(("auto", layouts[0], "auto"))
    plans = {}
    for tag, layout, batch in entries:
        plans[tag] = dry_run(config(tag, layout, batch)[0], env)
        if plans[tag]["device"] != args.device:
            raise SystemExit(f"the planner chose {plans[tag]['device']}, not --device {args.device}: "
                             "is the GPU visible to torch?")
        print(f"{tag}: batch {plans[tag]['batch_size']}, {plans[tag]['dtype']}, predicted peak "
              f"{plans[tag]['predicted_peak_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    runs: dict[str, list[dict]] = {tag: [] for tag, _, _ in entries}
    for r in range(args.rounds):
        for tag, layout, batch in entries if r % 2 == 0 else entries[::-1]:  # alternate so drift hits all alike
            cfg, out = config(f"{tag}-{r}", layout, batch)
            run = real_run(cfg, out, env, work / f"{tag}-{r}.log")
            runs[tag].append(run)
            print(f"round {r + 1}/{args.rounds} {tag}: {run['status']}, {run.get('tokens_per_s', 0):.1f} tok/s, "
                  f"peak {(run.get('peak_bytes') or 0) / 2**30:.2f} GiB ({run.get('peak_source')})",
                  file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - began

    sweep = {tag: {**summarise(plans[tag], runs[tag]), "layout": layout} for tag, layout, _ in entries[:-1]}
    auto = {**summarise(plans["auto"], runs["auto"]), "layout": layouts[0],
            "memory_budget_bytes": plans["auto"]["memory_budget_bytes"], "reasons": plans["auto"]["reasons"]}
    first = {tag: r for tag, r in sweep.items() if r["layout"] == layouts[0] and r["status"] == "completed"}
    speeds = {r["batch"]: r["tokens_per_s"] for r in first.values()}
    same = next((tag for tag in first if all(plans[tag][k] == plans["auto"][k] for k in PLAN_KEYS)), None)
    if same is not None and "tokens_per_s" in auto:
        # the same training as a sweep entry: its runs and the auto runs sample one speed
        pooled = statistics.median(v for x in [*runs[same], *runs["auto"]] if x["status"] == "completed"
                                   for v in x["step_rates"])
        sweep[same]["tokens_per_s_pooled_with_auto"] = speeds[sweep[same]["batch"]] = round(pooled, 2)
    best_batch = max(speeds, key=speeds.get) if speeds else None
    alone_ratio = None
    if first and "tokens_per_s" in auto:
        alone_ratio = round(auto["tokens_per_s"] / max(r["tokens_per_s"] for r in first.values()), 3)
    choice_ratio = round(speeds[auto["batch"]] / speeds[best_batch], 3) if same else alone_ratio
    no_oom = all(r["status"] == "completed" for r in [*sweep.values(), auto])
    within = [r for r in sweep.values() if "within_10pct" in r]
    goals = {
        "peak_within_10pct": {"met": bool(within) and all(r["within_10pct"] for r in within),
                              "ratios": {f"{r['layout']}-b{r['batch']}": r["measured_over_predicted"] for r in within}},
        "auto_batch_vs_best": {"ratio": choice_ratio, "goal": ">= 0.90",
                               "met": choice_ratio is not None and choice_ratio >= 0.9,
                               "auto_batch": auto["batch"], "best_batch": best_batch,
                               "auto_is_sweep_config": same,
                               "measure": f"tok/s of the batch auto picks ({layouts[0]} rows; its sweep runs and the "
                                          "auto runs pooled) over the best batch's",
                               "auto_runs_alone_ratio": alone_ratio},
        "no_out_of_memory": {"met": no_oom},
    }

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    gib = 2**30
    what = f"{args.shape} (random)" if args.shape else "SmolLM2-135M"
    held_as = "GPU memory held (NVML, else reserved)" if cuda else "peak RSS"
    table = Table(title=f"Planner vs measured ({held_as}), {what} LoRA on {args.device}, seq {args.seq}, grad_accum 1, "
                        f"{args.steps} steps x {args.rounds} round(s), {args.threads} thread(s)")
    for col in ("layout", "batch", "dtype", "checkpointing", "predicted GiB", "measured GiB", "measured / predicted",
                "within 10%", "tok/s (median step)", "status"):
        table.add_column(col)
    for r in [*sweep.values(), {**auto, "batch": f"auto ({auto['batch']})"}]:
        table.add_row(r["layout"], str(r["batch"]), r["dtype"], str(r["gradient_checkpointing"]),
                      f"{r['predicted_peak_bytes'] / gib:.2f}",
                      f"{r['peak_bytes'] / gib:.2f}" if "peak_bytes" in r else "-",
                      f"{r['measured_over_predicted']:.3f}" if "measured_over_predicted" in r else "-",
                      ("yes" if r["within_10pct"] else "NO") if "within_10pct" in r else "",
                      f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else "-", r["status"])
    console.print(table)
    g = goals["auto_batch_vs_best"]
    console.print(f"auto picked batch {auto['batch']} (budget {auto['memory_budget_bytes'] / gib:.1f} GiB)"
                  f"{f', the same training as sweep entry {same}' if same else ''}: "
                  f"{speeds.get(auto['batch'], auto.get('tokens_per_s', 0)):.1f} tok/s = {choice_ratio} of the best "
                  f"batch ({best_batch}), goal >= 0.90: {'met' if g['met'] else 'MISSED'}; the auto runs alone: "
                  f"{alone_ratio}. Peak within 10%: {'met' if goals['peak_within_10pct']['met'] else 'MISSED'}. "
                  f"No out-of-memory: {'yes' if no_oom else 'NO'}. {elapsed:.0f} s in all.")

    from finetune import machine

    result = {
        "machine": machine(),
        "settings": {"device": args.device, "shape": args.shape, "seq": args.seq, "batches": args.batches, "layouts": layouts, "steps": args.steps,
                     "rounds": args.rounds, "threads": args.threads, "grad_accum": 1, "dtype": "auto",
                     "method": "lora", "rank": 8, "targets": ["q_proj", "v_proj"]},
        "sweep": list(sweep.values()),
        "auto": auto,
        "goals": goals,
        "elapsed_s": round(elapsed, 1),
    }
    from finetune import finish

    finish(result, Path(args.out), work, args.keep)


if __name__ == "__main__":
    main()
