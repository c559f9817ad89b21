"""Generation speed: each localforge backend against its engine called directly, in one run.

For every backend that is installed, the same greedy prompts run through the raw engine
(transformers ``generate``, ``mlx_lm.stream_generate``, ``llama_cpp.Llama``) and through
localforge, interleaved, on the same model and threads. The table reports tokens/s for both
and their ratio (goal: >= 0.95), plus the wall time of ``localforge --help``.

    python benchmarks/generation.py [--backends torch,mlx,llamacpp] [--max-tokens 48]
                                    [--repeats 3] [--out benchmarks/results/generation.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "Write a short paragraph about the history of the printing press.",
    "Explain how a refrigerator keeps food cold.",
    "Describe a walk through a forest in autumn.",
]


def conv(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


# --- raw engines: the anchors ------------------------------------------------------------------


def raw_torch(hf_path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from localforge.backends.hf import quiet_transformers

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(hf_path)
    model = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32).eval()
    eos = tok.eos_token_id

    def run(prompt: str, max_tokens: int) -> int:
        text = tok.apply_chat_template(conv(prompt), tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=eos)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        return new.index(eos) if eos in new else len(new)

    return run


def raw_mlx(hf_path: str):
    import mlx_lm

    model, tok = mlx_lm.load(hf_path)

    def run(prompt: str, max_tokens: int) -> int:
        text = tok.apply_chat_template(conv(prompt), tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        n = 0
        for resp in mlx_lm.stream_generate(model, tok, ids, max_tokens=max_tokens):
            n = resp.generation_tokens - (resp.finish_reason == "stop")
        return n

    return run


def raw_llamacpp(gguf_path: str):
    from llama_cpp import Llama

    from localforge.hardware import default_threads

    # Same threads as localforge gives it (llama-cpp-python's own default is half the cores).
    llm = Llama(model_path=gguf_path, n_ctx=4096, n_threads=default_threads(), verbose=False)

    def run(prompt: str, max_tokens: int) -> int:
        out = llm.create_chat_completion(messages=conv(prompt), max_tokens=max_tokens, temperature=0.0)
        return out["usage"]["completion_tokens"]

    return run


def via_localforge(name: str):
    from localforge.backends import get_backend

    backend = get_backend(name, "smollm2-135m")

    def run(prompt: str, max_tokens: int) -> int:
        return backend.chat(conv(prompt), max_tokens=max_tokens).completion_tokens

    return run


# --- measuring -----------------------------------------------------------------------------------


def tokens_per_second(run, max_tokens: int) -> tuple[float, int]:
    tokens, t0 = 0, time.perf_counter()
    for prompt in PROMPTS:
        tokens += run(prompt, max_tokens)
    return tokens / (time.perf_counter() - t0), tokens


def bench_backend(name: str, max_tokens: int, repeats: int) -> dict:
    from localforge.backends import ensure_hf
    from localforge.models import resolve

    model = resolve("smollm2-135m")
    hf = ensure_hf(model)
    raw = {"torch": lambda: raw_torch(hf), "mlx": lambda: raw_mlx(hf),
           "llamacpp": lambda: raw_llamacpp(model.gguf_path)}[name]()
    ours = via_localforge(name)
    raw(PROMPTS[0], 4), ours(PROMPTS[0], 4)  # warm up both
    raw_tps, our_tps = [], []
    for _ in range(repeats):  # interleaved so drift hits both alike
        tps, raw_tokens = tokens_per_second(raw, max_tokens)
        raw_tps.append(tps)
        tps, our_tokens = tokens_per_second(ours, max_tokens)
        our_tps.append(tps)
    raw_med, our_med = statistics.median(raw_tps), statistics.median(our_tps)
    return {
        "backend": name,
        "anchor": {"torch": "transformers generate", "mlx": "mlx_lm.stream_generate",
                   "llamacpp": "llama_cpp.Llama"}[name],
        "raw_tokens_per_s": round(raw_med, 2),
        "localforge_tokens_per_s": round(our_med, 2),
        "ratio": round(our_med / raw_med, 3),
        "tokens_per_round": {"raw": raw_tokens, "localforge": our_tokens},
    }


def help_wall_time(repeats: int = 5) -> dict:
    def timed(args: list[str]) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(args, capture_output=True, check=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return {
        "localforge_help_s": round(timed([sys.executable, "-m", "localforge", "--help"]), 3),
        "python_startup_s": round(timed([sys.executable, "-c", "pass"]), 3),
    }


ANCHORED = ("torch", "mlx", "llamacpp")  # the backends with an engine to call directly (see bench_backend)


def main() -> None:
    from localforge.backends import availability

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=",".join(ANCHORED))
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/generation.json")
    args = ap.parse_args()

    rows = []
    for name in args.backends.split(","):
        if name not in ANCHORED:
            sys.exit(f"--backends: {name} has no engine to call directly here (choose from {', '.join(ANCHORED)})")
        ok, reason = availability(name)
        if not ok:
            print(f"skipping {name}: {reason}", file=sys.stderr)
            continue
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        rows.append(bench_backend(name, args.max_tokens, args.repeats))
    startup = help_wall_time()

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Generation, SmolLM2-135M, greedy, {len(PROMPTS)} prompts x {args.max_tokens} tokens")
    for col in ("backend", "anchor", "raw tok/s", "localforge tok/s", "ratio"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["backend"], r["anchor"], f"{r['raw_tokens_per_s']:.1f}",
                      f"{r['localforge_tokens_per_s']:.1f}", f"{r['ratio']:.3f}")
    Console().print(table)
    print(f"localforge --help: {startup['localforge_help_s']:.3f} s "
          f"(python startup alone: {startup['python_startup_s']:.3f} s)")

    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "settings": {"max_tokens": args.max_tokens, "repeats": args.repeats, "prompts": PROMPTS},
        "backends": rows,
        "startup": startup,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
