"""GRPO speed and memory: ``localforge finetune`` (method grpo) against TRL's GRPOTrainer called
directly with the same settings, side by side in one run.

Every contender trains the bundled SmolLM2-135M with LoRA (rank 8, alpha 16, q_proj + v_proj,
every layer) on one GSM8K question (the shared corpus's first; a similar one when it is absent), with
the same rewards (localforge's exact_match and format, weight 1 and 0.5), generations per prompt,
completion length, prompts per step, beta, epsilon, temperature, learning rate (constant), fp32 on
a CPU (GRPOConfig's default bf16 autocast is turned off for TRL: on a CPU without bf16 units it is
several times slower) and bf16 on CUDA, no gradient checkpointing and clipping at 1.0, each in its own process on the same thread count:

- ``localforge-torch``: ``localforge finetune CONFIG --no-progress`` (the CLI, TRL underneath, a
  step at a time);
- ``trl``: ``GRPOTrainer(...).train()`` with a peft LoRA config, its own data loader and loop;
- ``trl-vllm`` (CUDA hosts with vLLM only): the same with ``use_vllm=True, vllm_mode="colocate"``;
- ``localforge-mlx`` (``--mlx``): the same config on MLX (mlx-lm-lora), for reference (no anchor
  runs MLX GRPO the same way here).

Sampling differs between contenders (seeds reach the sampler through different paths), so a step's
completions differ in length; the table gives seconds per step and tokens per second (prompt and
completion tokens a step processed, as each reports them), the median over every step but the
first of every round. Peak RSS is each child's ``ru_maxrss`` (``os.wait4``). Goal: localforge
within 5% of TRL on the CPU (tokens/s ratio >= 0.95, peak RSS ratio <= 1.05).

    python benchmarks/grpo.py [--steps 4] [--rounds 2] [--generations 4] [--tokens 32]
                              [--batch 1] [--accum 2] [--threads 1] [--mlx] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from finetune import (  # benchmarks/finetune.py: one thread per child, its peak RSS, TRL step times
    _tail,
    child_env,
    run_process,
    step_timer,
)

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "corpus" / "gsm8k" / "train-first2000.jsonl"
LORA = {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}
LR, SEED, BETA, EPSILON = 1e-5, 0, 0.04, 0.2
REWARDS = [("exact_match", 1.0), ("format", 0.5)]


def write_rows(path: Path, n: int = 64) -> Path:
    """``n`` rows of one GSM8K question: the contenders order their data differently (localforge by
    (seed, step), TRL by its sampler), and with one question every step of every contender reads
    the same prompt, so a step's work differs only by where sampling stops."""
    if GSM8K.is_file():
        r = json.loads(GSM8K.read_text(encoding="utf-8").splitlines()[0])
        row = {"question": r["question"], "answer": r["answer"]}
    else:
        row = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?", "answer": "#### 72"}
    path.write_text((json.dumps(row) + "\n") * n)
    return path


# --- children --------------------------------------------------------------------------------------
def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from localforge.backends.hf import quiet_transformers
    from localforge.finetune import rewards as lib

    torch.set_num_threads(spec["threads"])
    quiet_transformers()
    steps: list[dict] = []

    def reward(name):
        def fn(prompts, completions, **fields):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return lib.REWARDS[name]([""] * len(texts), texts, {"answer": fields["answer"]})

        fn.__name__ = name
        return fn

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
                              for r in rows])
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    cuda = torch.cuda.is_available()
    # localforge's plan: fp32 on a CPU, bf16 weights on CUDA. GRPOConfig defaults to bf16 autocast,
    # which on a CPU without bf16 units is several times slower: set both sides alike
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.bfloat16 if cuda else torch.float32)
    config = GRPOConfig(
        output_dir=str(Path(spec["work"], "trl")), report_to=[], save_strategy="no", logging_strategy="no",
        per_device_train_batch_size=spec["batch"] * spec["generations"], gradient_accumulation_steps=spec["accum"],
        steps_per_generation=spec["accum"], num_iterations=1, num_generations=spec["generations"],
        max_completion_length=spec["tokens"], beta=BETA, epsilon=EPSILON, temperature=1.0, top_p=1.0,
        reward_weights=[w for _, w in REWARDS], max_steps=spec["steps"], learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, seed=SEED, use_cpu=not cuda,
        activation_checkpointing=False, log_completions=False, disable_tqdm=True, bf16=cuda, fp16=False,
        use_vllm=spec.get("vllm", False), vllm_mode="colocate")
    peft = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["targets"],
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[reward(n) for n, _ in REWARDS], args=config, train_dataset=data,
                          processing_class=tok, peft_config=peft, callbacks=[step_timer(steps)])
    trainer.train()
    return {"steps": steps}


def child_main(name: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = child_trl({**spec, "vllm": name == "trl-vllm"})
    Path(result_path).write_text(json.dumps(result))


# --- the parent ------------------------------------------------------------------------------------
def run_localforge(backend: str, s: dict, work: Path, tag: str) -> dict:
    import yaml

    out = work / f"run-{tag}"
    cfg = {"model": "smollm2-135m", "data": s["data"], "backend": backend, "method": "grpo",
           "lora": {"rank": LORA["rank"], "alpha": LORA["alpha"], "dropout": 0.0, "targets": LORA["targets"]},
           "steps": s["steps"], "batch_size": s["batch"], "grad_accum": s["accum"], "learning_rate": LR,
           "lr_schedule": "constant", "dtype": "fp32", "gradient_checkpointing": False, "seed": SEED,
           "save_every": 1_000_000, "max_grad_norm": 1.0, "output_dir": str(out),
           "grpo": {"rewards": [{"name": n, "weight": w} for n, w in REWARDS], "num_generations": s["generations"],
                    "max_completion_length": s["tokens"], "beta": BETA, "epsilon": EPSILON, "temperature": 1.0,
                    "max_prompt_length": 512}}
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = run_process([sys.executable, "-m", "localforge", "finetune", str(path), "--no-progress"],
                       child_env(s["threads"]), work / f"{tag}.log")
    if proc["rc"] != 0:
        raise RuntimeError(f"localforge {backend} failed (exit {proc['rc']}):\n{_tail(work / f'{tag}.log')}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [{"tokens": r["tokens"], "step_s": r["seconds"], "completion_length": r["completion_length"],
              "reward": r["reward"]} for r in rows if "loss" in r]
    return {"steps": steps, **proc}


def run_child(name: str, s: dict, work: Path, tag: str) -> dict:
    spec_path, result_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps({**s, "work": str(work / tag)}))
    (work / tag).mkdir(exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, str(spec_path), str(result_path)]
    proc = run_process(cmd, child_env(s["threads"]), work / f"{tag}.log")
    if proc["rc"] != 0 or not result_path.exists():
        raise RuntimeError(f"{name} failed (exit {proc['rc']}):\n{_tail(work / f'{tag}.log')}")
    return {**json.loads(result_path.read_text()), **proc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="steps per run (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32, help="max completion length")
    ap.add_argument("--batch", type=int, default=1, help="prompts per micro-batch")
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for every contender (1: on a shared 2-core VM two threads collapse when another "
                         "process takes a core)")
    ap.add_argument("--mlx", action="store_true", help="also localforge on MLX (mlx-lm-lora), for reference")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    ap.add_argument("--out", default="benchmarks/results/grpo.json")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds, args.generations, args.tokens = 3, 1, 2, 16

    from importlib.util import find_spec

    from localforge.backends import ensure_hf
    from localforge.models import resolve

    model_path = ensure_hf(resolve("smollm2-135m"))
    work = Path(tempfile.mkdtemp(prefix="lf-bench-grpo-"))
    s = {"steps": args.steps, "generations": args.generations, "tokens": args.tokens, "batch": args.batch,
         "accum": args.accum, "threads": args.threads, "model_path": model_path,
         "data": str(write_rows(work / "train.jsonl"))}
    contenders = ["localforge-torch", "trl"]
    skipped = {}
    cuda = False
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        pass
    if cuda and find_spec("vllm") is not None:
        contenders.append("trl-vllm")
    else:
        skipped["trl-vllm"] = "needs a CUDA host with vLLM installed"
    if args.mlx:
        contenders.append("localforge-mlx")
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    failed: dict[str, str] = {}
    for r in range(args.rounds):
        for name in contenders if r % 2 == 0 else contenders[::-1]:
            print(f"round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            try:
                res = (run_localforge(name.removeprefix("localforge-"), s, work, f"{name}-{r}")
                       if name.startswith("localforge-") else run_child(name, s, work, f"{name}-{r}"))
            except RuntimeError as exc:
                print(f"  failed: {exc}", file=sys.stderr)
                failed.setdefault(name, str(exc)[-2000:])
                continue
            if len(res["steps"]) != args.steps:
                failed.setdefault(name, f"{len(res['steps'])} steps reported, expected {args.steps}")
                continue
            runs[name].append(res)
            timed = res["steps"][1:]
            print(f"  {statistics.median(x['step_s'] for x in timed):.2f} s/step", file=sys.stderr, flush=True)

    rows = {}
    for name, rs in runs.items():
        timed = [x for res in rs for x in res["steps"][1:]]
        if not timed:
            continue
        rows[name] = {"s_per_step": round(statistics.median(x["step_s"] for x in timed), 3),
                      "tokens_per_s": round(statistics.median(x["tokens"] / x["step_s"] for x in timed), 2),
                      "tokens_per_step": round(statistics.mean(x["tokens"] for x in timed), 1),
                      "peak_rss_bytes": max(res["peak_rss_bytes"] for res in rs), "rounds": len(rs), "runs": rs}

    def ratio(a: str, b: str, key: str) -> float | None:
        return round(rows[a][key] / rows[b][key], 3) if a in rows and b in rows and rows[b][key] else None

    goals = {"localforge_torch_vs_trl_tokens_per_s": {"ratio": ratio("localforge-torch", "trl", "tokens_per_s"),
                                                      "goal": ">= 0.95"},
             "localforge_torch_vs_trl_s_per_step": {"ratio": ratio("localforge-torch", "trl", "s_per_step"),
                                                    "goal": "<= 1.05"},
             "peak_rss_localforge_torch_vs_trl": {"ratio": ratio("localforge-torch", "trl", "peak_rss_bytes"),
                                                  "goal": "<= 1.05"}}
    if "trl-vllm" in contenders:
        goals["localforge_torch_vs_trl_vllm_tokens_per_s"] = {
            "ratio": ratio("localforge-torch", "trl-vllm", "tokens_per_s"), "goal": ">= 0.95"}
    for g in goals.values():
        if g["ratio"] is not None:
            op, target = g["goal"].split()
            g["met"] = g["ratio"] >= float(target) if op == ">=" else g["ratio"] <= float(target)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"GRPO, SmolLM2-135M LoRA fp32: {args.batch * args.accum} prompts x {args.generations} "
                        f"generations of <= {args.tokens} tokens per step, {args.steps} steps (first excluded), "
                        f"{args.threads} thread(s), {args.rounds} round(s)")
    for col in ("contender", "s/step", "tokens/s", "tokens/step", "peak RSS GiB", "vs trl (tokens/s)"):
        table.add_column(col)
    for name, r in rows.items():
        vs = ratio(name, "trl", "tokens_per_s") if name != "trl" else None
        table.add_row(name, f"{r['s_per_step']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_step']:.0f}",
                      f"{r['peak_rss_bytes'] / 2**30:.2f}", f"{vs:.3f}x" if vs else "")
    console = Console(width=max(Console().width, 140))
    console.print(table)
    for key, g in goals.items():
        console.print(f"{key}: {g['ratio']} (goal {g['goal']}){'' if 'met' not in g else ' met' if g['met'] else ' NOT met'}")
    for name, why in {**skipped, **failed}.items():
        console.print(f"[dim]{name}: {why.splitlines()[-1] if why else ''}[/]")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {k: v for k, v in s.items() if k != "data"}, "rows": rows, "goals": goals,
                               "skipped": skipped, "failed": failed, "load_average": load,
                               "cuda": cuda, "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:5])
    else:
        main()
