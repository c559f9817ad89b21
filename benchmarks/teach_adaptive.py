"""`teach adaptive` and `teach eval` throughput on one real llama.cpp server (the bundled model as
teacher and student).

- questions/s for two-pass adaptive teaching at 1, 2 and 4 questions in flight (the call cache off),
  on the same server and the same GSM8K questions;
- `teach eval` (the answer without teaching on top) at the top level, cold and then warm from the
  call cache, with its figures.

    python benchmarks/teach_adaptive.py [--items 8] [--levels 1,2,4]

Prints a table and writes benchmarks/results/teach_adaptive.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.servers

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "corpus" / "gsm8k" / "test.jsonl"


def settings_for(url: str, concurrency: int, cache: bool, args):
    from localforge.teach.adaptive import AdaptiveSettings

    role = {"backend": "openai", "model": "smollm2-135m", "base_url": url, "concurrency": concurrency}
    return AdaptiveSettings(teacher=role, student=role, probe_tokens=args.probe_tokens,
                            teaching_tokens=args.teaching_tokens, max_tokens=args.answer_tokens,
                            critique_tokens=160, concurrency=concurrency, cache=cache)


def adaptive_run(src: Path, out: Path, url: str, concurrency: int, args) -> dict:
    from localforge.teach.adaptive import run

    t0 = time.perf_counter()
    summary = run(src, out, settings_for(url, concurrency, False, args))
    seconds = time.perf_counter() - t0
    return {"run": "adaptive", "concurrency": concurrency, "cache": False, "items": summary.done,
            "failed": len(summary.failed), "seconds": round(seconds, 2),
            "items_per_s": round(summary.done / seconds, 3), "bands": summary.bands}


def eval_run(src: Path, out: Path, url: str, concurrency: int, name: str, args) -> dict:
    from localforge.teach.evaluate import run

    t0 = time.perf_counter()
    report, summary = run(src, out, settings_for(url, concurrency, True, args))
    seconds = time.perf_counter() - t0
    keys = ("n", "accuracy_without", "accuracy_with", "gain", "non_degradation_rate", "mean_teaching_tokens",
            "mean_reward")
    return {"run": name, "concurrency": concurrency, "cache": True, "items": summary.done,
            "failed": len(summary.failed), "seconds": round(seconds, 2),
            "items_per_s": round(summary.done / seconds, 3), "bands": summary.bands,
            "figures": {k: report[k] for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--probe-tokens", type=int, default=50)
    parser.add_argument("--teaching-tokens", type=int, default=200)
    parser.add_argument("--answer-tokens", type=int, default=256)
    parser.add_argument("--levels", default="1,2,4")
    args = parser.parse_args()
    if not GSM8K.is_file():
        sys.exit(f"the shared GSM8K corpus is not at {GSM8K}")

    from localforge.models import resolve
    from tests.servers import LlamaServer

    work = Path(tempfile.mkdtemp(prefix="bench-teach-adaptive-"))
    os.environ["LOCALFORGE_CACHE"] = str(work / "cache")  # a cold call cache, this run's own
    src = work / "questions.jsonl"
    src.write_text("".join(line + "\n" for line in GSM8K.read_text().splitlines()[: args.items]))
    levels = [int(x) for x in args.levels.split(",")]
    server = LlamaServer(resolve("smollm2-135m").gguf_path).start()
    rows = []
    try:
        for level in levels:
            rows.append(adaptive_run(src, work / f"c{level}.jsonl", server.url, level, args))
        rows.append(eval_run(src, work / "cold.json", server.url, max(levels), "eval cold", args))
        rows.append(eval_run(src, work / "warm.json", server.url, max(levels), "eval warm", args))
    finally:
        server.stop()

    print(f"teach adaptive / eval: {args.items} GSM8K questions, smollm2-135m teacher and student on one "
          f"llama.cpp server; probe {args.probe_tokens}, teaching {args.teaching_tokens}, "
          f"answers {args.answer_tokens} tokens")
    print(f"{'run':<12}{'in flight':>10}{'items':>7}{'failed':>8}{'seconds':>9}{'items/s':>9}  bands")
    for r in rows:
        print(f"{r['run']:<12}{r['concurrency']:>10}{r['items']:>7}{r['failed']:>8}{r['seconds']:>9.2f}"
              f"{r['items_per_s']:>9.3f}  {r['bands']}")
    warm, cold = rows[-1], rows[-2]
    speedup = cold["seconds"] / warm["seconds"] if warm["seconds"] else float("inf")
    print(f"cache: a warm eval re-run takes {warm['seconds']:.2f} s against {cold['seconds']:.2f} s cold "
          f"({speedup:.0f}x)")
    print("eval figures:", json.dumps(cold["figures"]))
    result = {"benchmark": "teach-adaptive", "machine": platform.platform(), "python": platform.python_version(),
              "settings": vars(args), "runs": rows, "cache_speedup": round(speedup, 1)}
    out = ROOT / "benchmarks" / "results" / "teach_adaptive.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
