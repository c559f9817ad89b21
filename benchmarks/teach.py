"""`teach dcr` throughput on one real llama.cpp server (the bundled model as teacher and student).

- items/s for Draft-Critique-Revise at 1, 2 and 4 items in flight (the call cache off), on the
  same server and the same GSM8K questions;
- the call cache's effect: the same run twice with the cache on (cold, then warm) into fresh outputs.

    python benchmarks/teach.py [--items 8] [--max-iterations 2] [--levels 1,2,4]

Prints a table and writes benchmarks/results/teach.json. distilabel's critique-and-rewrite
pipeline is not run beside it: distilabel is not installed in this stack (not in the `bench`
extra), so there is no side-by-side number.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.servers

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "corpus" / "gsm8k" / "test.jsonl"
FALLBACK = [f"A box holds {a} red and {a + 3} blue marbles. How many marbles are in {a % 3 + 2} boxes?"
            for a in range(2, 40)]


def questions(n: int) -> list[dict]:
    if GSM8K.is_file():
        rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
        return [{"instruction": r["question"]} for r in rows]
    return [{"instruction": q} for q in FALLBACK[:n]]


def one_run(src: Path, out: Path, url: str, concurrency: int, cache: bool, args) -> dict:
    from localforge.teach.dcr import run
    from localforge.teach.settings import TeachSettings

    role = {"backend": "openai", "model": "smollm2-135m", "base_url": url, "concurrency": concurrency}
    settings = TeachSettings(teacher=role, student=role, max_iterations=args.max_iterations,
                             threshold=args.threshold, max_tokens=args.max_tokens,
                             critique_tokens=args.critique_tokens, concurrency=concurrency, cache=cache)
    t0 = time.perf_counter()
    summary = run(src, out, settings)
    seconds = time.perf_counter() - t0
    return {"concurrency": concurrency, "cache": cache, "items": summary.done, "failed": len(summary.failed),
            "iterations": summary.iterations, "seconds": round(seconds, 2),
            "items_per_s": round(summary.done / seconds, 3), "mean_score": round(summary.mean_score, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--max-iterations", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--critique-tokens", type=int, default=160)
    parser.add_argument("--levels", default="1,2,4")
    args = parser.parse_args()

    import os

    from localforge.models import resolve
    from tests.servers import LlamaServer

    work = Path(tempfile.mkdtemp(prefix="bench-teach-"))
    os.environ["LOCALFORGE_CACHE"] = str(work / "cache")  # a cold call cache, this run's own
    src = work / "items.jsonl"
    src.write_text("".join(json.dumps(q) + "\n" for q in questions(args.items)))
    server = LlamaServer(resolve("smollm2-135m").gguf_path).start()
    rows = []
    try:
        for level in (int(x) for x in args.levels.split(",")):
            rows.append(one_run(src, work / f"c{level}.jsonl", server.url, level, False, args))
        top = max(int(x) for x in args.levels.split(","))
        rows.append({**one_run(src, work / "cold.jsonl", server.url, top, True, args), "run": "cache cold"})
        rows.append({**one_run(src, work / "warm.jsonl", server.url, top, True, args), "run": "cache warm"})
    finally:
        server.stop()

    print(f"teach dcr: {args.items} GSM8K questions, smollm2-135m teacher and student on one llama.cpp server, "
          f"max_iterations {args.max_iterations}, threshold {args.threshold}")
    print(f"{'run':<14}{'in flight':>10}{'items':>7}{'failed':>8}{'iters':>7}{'seconds':>9}{'items/s':>9}{'score':>7}")
    for r in rows:
        name = r.get("run", "no cache")
        print(f"{name:<14}{r['concurrency']:>10}{r['items']:>7}{r['failed']:>8}{r['iterations']:>7}"
              f"{r['seconds']:>9.2f}{r['items_per_s']:>9.3f}{r['mean_score']:>7.2f}")
    warm, cold = rows[-1], rows[-2]
    speedup = cold["seconds"] / warm["seconds"] if warm["seconds"] else float("inf")
    print(f"cache: a warm re-run takes {warm['seconds']:.2f} s against {cold['seconds']:.2f} s cold ({speedup:.0f}x)")
    result = {"benchmark": "teach-dcr", "machine": platform.platform(), "python": platform.python_version(),
              "settings": vars(args), "runs": rows, "cache_speedup": round(speedup, 1),
              "distilabel": "not installed in this stack (not in the bench extra): no side-by-side run"}
    out = ROOT / "benchmarks" / "results" / "teach.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
