"""`teach dcr` throughput on one real llama.cpp server (the bundled model as teacher and student).

- items/s for Draft-Critique-Revise at 1, 2 and 4 items in flight (the call cache off), on the
  same server and the same GSM8K questions;
- the call cache's effect: the same run twice with the cache on (cold, then warm) into fresh outputs;
- beside it, when distilabel imports here (`pip install -e ".[bench]"`), distilabel's own
  critique-and-rewrite pipeline over the same items, on the same server, with the same token limits,
  temperature and seed, at the same levels.

    python benchmarks/teach.py [--items 8] [--max-iterations 2] [--levels 1,2,4] [--out FILE]

The distilabel pipeline is DCR unrolled: a `TextGeneration` step drafts (the student), an
`UltraFeedback` step (aspect "overall-rating": a 1-5 rating and a rationale) critiques, and a
`TextGeneration` step whose template carries that rationale rewrites; with --max-iterations N it
runs N critiques and N-1 rewrites, the most a DCR item does. A distilabel DAG has no loop, so
every item goes the whole way, where DCR stops an item once its score reaches the threshold: the
`calls` column says how many model calls each side made (for localforge, drafts + critiques +
rewrites, JSON re-asks not counted). `CLAIR` is distilabel's revision task, but it critiques and
rewrites in one call, which is not DCR's draft -> critique -> rewrite. localforge's critique is
schema-constrained JSON; UltraFeedback's is free text that distilabel parses (a rating it cannot
read counts as `unparsed`). Every distilabel step takes `level` rows a batch and sends them at
once; its steps run side by side in their own processes, so up to steps x level requests can be
queued at the server, which answers one at a time (llama-cpp-python's server takes one request at
a time, for both sides). distilabel runs offline (HF_HUB_OFFLINE), with its cache off
(`use_cache=False`) and its files in a temporary folder; its seconds include the start-up of its
step processes, measured on its own as well (a pipeline that calls no model).

distilabel 1.5.3 (`distilabel[openai]`, in the `bench` extra) installs beside the stack: pip adds
distilabel, nest-asyncio, orjson, portalocker, tblib, universal-pathlib and pathlib-abc, and
changes no installed version (torch, transformers, pydantic, datasets, openai stay as they are).

Prints a table and writes benchmarks/results/teach.json (or --out).
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
MODEL = "smollm2-135m"  # the name the server serves the model under (tests.servers.ALIAS)
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

    role = {"backend": "openai", "model": MODEL, "base_url": url, "concurrency": concurrency}
    settings = TeachSettings(teacher=role, student=role, max_iterations=args.max_iterations,
                             threshold=args.threshold, max_tokens=args.max_tokens,
                             critique_tokens=args.critique_tokens, concurrency=concurrency, cache=cache)
    t0 = time.perf_counter()
    summary = run(src, out, settings)
    seconds = time.perf_counter() - t0
    calls = summary.done + summary.iterations + (summary.iterations - summary.done)  # drafts, critiques, rewrites
    return {"run": "localforge", "concurrency": concurrency, "cache": cache,
            "items": summary.done, "failed": len(summary.failed), "iterations": summary.iterations,
            "calls": calls, "seconds": round(seconds, 2),
            "items_per_s": round(summary.done / seconds, 3), "mean_score": round(summary.mean_score, 3)}


# --- distilabel, side by side ---------------------------------------------------------------

REWRITE_SYSTEM = ("You are a teacher rewriting an answer. Fix every point of the feedback. "
                  "Reply with the improved answer alone.")
# answer and feedback are one-item lists; a rationale distilabel could not parse is None, and then
# the rewrite gets DCR's own fallback for a critique without notes. (TextGeneration wants each
# column named plainly in the template, hence the {% set %}.)
REWRITE_TEMPLATE = ("{% set draft = answer[0] %}{% set notes = feedback[0] or "
                    "'make it more correct, complete and clear' %}"
                    "Instruction:\n{{ instruction }}\n\nAnswer:\n{{ draft }}\n\nFeedback:\n{{ notes }}")


def distilabel_missing() -> str | None:
    """None when distilabel's pipeline, OpenAILLM and tasks import here; else why not, in one line."""
    try:
        from distilabel.models import OpenAILLM  # noqa: F401
        from distilabel.pipeline import Pipeline  # noqa: F401
        from distilabel.steps.tasks import TextGeneration, UltraFeedback  # noqa: F401
    except Exception as exc:  # not installed, or a clash with the stack raised while importing
        return f"distilabel does not import here ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return None


def distilabel_overhead(rows: list[dict]) -> float:
    """Seconds for a distilabel pipeline that calls no model: its processes' start-up and teardown."""
    from distilabel.pipeline import Pipeline
    from distilabel.steps import KeepColumns, LoadDataFromDicts

    with Pipeline(name="bench-teach-empty") as pipeline:
        LoadDataFromDicts(data=rows) >> KeepColumns(columns=["instruction"])
    t0 = time.perf_counter()
    pipeline.run(use_cache=False)
    return round(time.perf_counter() - t0, 2)


def distilabel_run(rows: list[dict], url: str, level: int, args) -> dict:
    """Draft, then (critique, rewrite) x (N-1), then a last critique, as one distilabel pipeline."""
    from distilabel.models import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import TextGeneration, UltraFeedback

    from localforge.teach.settings import TeachSettings

    fields = TeachSettings.model_fields  # the temperature and seed one_run's calls carry (the defaults)
    temperature, seed = fields["temperature"].default, fields["seed"].default

    def llm(tokens: int) -> OpenAILLM:
        return OpenAILLM(model=MODEL, base_url=url, api_key="none", generation_kwargs={
            "max_new_tokens": tokens, "temperature": temperature, "extra_body": {"seed": seed}})

    n = args.max_iterations
    with Pipeline(name=f"bench-teach-c{level}") as pipeline:
        last = LoadDataFromDicts(data=rows, batch_size=level)
        step = TextGeneration(name="draft", llm=llm(args.max_tokens), input_batch_size=level,
                              group_generations=True, output_mappings={"generation": "answer_1"})
        last = last >> step
        for i in range(1, n + 1):
            step = UltraFeedback(name=f"critique_{i}", aspect="overall-rating", llm=llm(args.critique_tokens),
                                 input_batch_size=level, input_mappings={"generations": f"answer_{i}"},
                                 output_mappings={"ratings": f"ratings_{i}", "rationales": f"feedback_{i}"})
            last = last >> step
            if i < n:
                step = TextGeneration(name=f"rewrite_{i}", llm=llm(args.max_tokens), input_batch_size=level,
                                      system_prompt=REWRITE_SYSTEM, template=REWRITE_TEMPLATE,
                                      columns=["instruction", "answer", "feedback"],
                                      input_mappings={"answer": f"answer_{i}", "feedback": f"feedback_{i}"},
                                      group_generations=True, output_mappings={"generation": f"answer_{i + 1}"})
                last = last >> step
    t0 = time.perf_counter()
    distiset = pipeline.run(use_cache=False)
    seconds = time.perf_counter() - t0
    out = list(distiset["default"]["train"]) if distiset else []

    def answered(row: dict) -> bool:  # the drafts, rewrites and last critique came back (None: a call failed)
        # (each step replaces distilabel_metadata, so only the last critique's raw output is left there)
        texts = [(row.get(f"answer_{i}") or [None])[0] for i in range(1, n + 1)]
        critique = (row.get("distilabel_metadata") or {}).get(f"raw_output_critique_{n}")
        return all(t is not None for t in texts) and critique is not None

    done = [r for r in out if answered(r)]
    ratings = [(r.get(f"ratings_{n}") or [None])[0] for r in done]
    read = [float(x) for x in ratings if isinstance(x, (int, float))]
    return {"run": "distilabel", "concurrency": level, "cache": False, "items": len(done),
            "failed": len(rows) - len(done), "iterations": n * len(done), "calls": 2 * n * len(done),
            "seconds": round(seconds, 2), "items_per_s": round(len(done) / seconds, 3),
            "mean_score": round(sum((x - 1) / 4 for x in read) / len(read), 3) if read else None,
            "unparsed": len(ratings) - len(read)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--max-iterations", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--critique-tokens", type=int, default=160)
    parser.add_argument("--levels", default="1,2,4")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "teach.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    from localforge.models import resolve
    from tests.servers import LlamaServer

    work = Path(tempfile.mkdtemp(prefix="bench-teach-"))
    os.environ["LOCALFORGE_CACHE"] = str(work / "cache")  # a cold call cache, this run's own
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # distilabel: nothing from the hub
    os.environ["DISTILABEL_CACHE_DIR"] = str(work / "distilabel")  # its data and logs, this run's own
    os.environ.setdefault("DISTILABEL_LOG_LEVEL", "WARNING")
    missing = distilabel_missing()
    items = questions(args.items)
    src = work / "items.jsonl"
    src.write_text("".join(json.dumps(q) + "\n" for q in items))
    server = LlamaServer(resolve(MODEL).gguf_path).start()
    rows, theirs, overhead = [], [], None
    try:
        if missing is None:
            overhead = distilabel_overhead(items)
        for level in levels:  # the two side by side, one level after the other, under the same load
            rows.append(one_run(src, work / f"c{level}.jsonl", server.url, level, False, args))
            if missing is None:
                theirs.append(distilabel_run(items, server.url, level, args))
        rows.append({**one_run(src, work / "cold.jsonl", server.url, max(levels), True, args), "run": "cache cold"})
        rows.append({**one_run(src, work / "warm.jsonl", server.url, max(levels), True, args), "run": "cache warm"})
    finally:
        server.stop()

    print(f"teach dcr: {args.items} GSM8K questions, {MODEL} teacher and student on one llama.cpp server, "
          f"max_iterations {args.max_iterations}, threshold {args.threshold}")
    print(f"{'run':<12}{'in flight':>10}{'items':>7}{'failed':>8}{'iters':>7}{'calls':>7}{'seconds':>9}"
          f"{'items/s':>9}{'score':>7}")
    for r in rows + theirs:
        score = "n/a" if r["mean_score"] is None else f"{r['mean_score']:.2f}"
        print(f"{r['run']:<12}{r['concurrency']:>10}{r['items']:>7}{r['failed']:>8}{r['iterations']:>7}"
              f"{r['calls']:>7}{r['seconds']:>9.2f}{r['items_per_s']:>9.3f}{score:>7}")
    warm, cold = rows[-1], rows[-2]
    speedup = cold["seconds"] / warm["seconds"] if warm["seconds"] else float("inf")
    print(f"cache: a warm re-run takes {warm['seconds']:.2f} s against {cold['seconds']:.2f} s cold ({speedup:.0f}x)")
    if missing is None:
        import distilabel

        n = args.max_iterations
        print(f"distilabel {distilabel.__version__}: TextGeneration draft, {n} UltraFeedback critique(s), "
              f"{n - 1} TextGeneration rewrite(s) per item; its start-up and teardown alone (no model call): "
              f"{overhead:.2f} s; ratings it could not parse, per level: "
              f"{', '.join(str(r['unparsed']) for r in theirs)} of {args.items}")
        print(f"{'in flight':>10}{'localforge items/s':>20}{'distilabel items/s':>20}")
        for ours, other in zip(rows[:len(levels)], theirs, strict=True):
            print(f"{ours['concurrency']:>10}{ours['items_per_s']:>20.3f}{other['items_per_s']:>20.3f}")
        compared = {"version": distilabel.__version__,
                    "pipeline": "TextGeneration (draft) -> UltraFeedback overall-rating (critique) -> "
                                "TextGeneration with the rationale (rewrite), N critiques and N-1 rewrites",
                    "startup_s": overhead, "runs": theirs}
    else:
        print(f"distilabel: not run: {missing}; it comes with the bench extra (pip install -e \".[bench]\")")
        compared = {"not_run": missing}
    result = {"benchmark": "teach-dcr", "machine": platform.platform(), "python": platform.python_version(),
              "settings": {**vars(args), "out": str(args.out)}, "runs": rows, "cache_speedup": round(speedup, 1),
              "distilabel": compared}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
