"""`localforge run` against the same work done by hand, one command per job, in the same run.

The by-hand side is what a user types without the pipeline: `extract` (+ `extract review`),
`teach generate`, `teach dataset export`, `finetune` on the exported rows and `export`, each a
fresh process, with the pipeline file's settings and the call cache off on both sides. The pipeline
also evaluates (no single command does that), so its eval stage is listed on its own and left out
of the ratio. A second `localforge run` with nothing changed measures what skipping costs.

    python benchmarks/pipeline.py [--docs 3] [--steps 24]

Prints a table (seconds per stage, both sides, and the ratio) and writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pipeline"
RESULTS = ROOT / "benchmarks" / "results"
MATCHED = ("extract", "generate", "dataset", "finetune", "export")


def cli(*args: str, cwd: Path) -> float:
    """Seconds one `localforge` command took; a failure stops the benchmark with its stderr."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "localforge", *args], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"localforge {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def pipeline_file(work: Path, docs: int, steps: int) -> dict:
    spec = yaml.safe_load((EXAMPLE / "pipeline.yaml").read_text())
    (work / "docs").mkdir()
    for path in sorted((EXAMPLE / "docs").iterdir())[:docs]:
        shutil.copy(path, work / "docs" / path.name)
    shutil.copy(EXAMPLE / "schema.json", work / "schema.json")
    spec.update(output_dir=str(work / "run"), backend="torch")
    spec["extract"]["cache"] = False
    spec["generate"]["cache"] = False
    spec["finetune"]["steps"] = steps
    (work / "pipeline.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec


def by_hand(work: Path, spec: dict) -> dict[str, float]:
    out = work / "hand"
    out.mkdir()
    ex, ge, ft, exp = spec["extract"], spec["generate"], dict(spec["finetune"]), spec["export"]
    t = {"extract": cli("extract", "docs", "--schema", "schema.json", "--chunk-size", str(ex["chunk_size"]),
                        "--no-cache", "-o", str(out / "records.jsonl"), cwd=work)}
    t["extract"] += cli("extract", "review", str(out / "records.jsonl"), "-o", str(out / "review.html"), cwd=work)
    t["generate"] = cli("teach", "generate", str(out / "records.jsonl"), "-o", str(out / "pairs.jsonl"), "--no-cache",
                        *(f"{k}={v}" for k, v in ge.items() if k != "cache"), cwd=work)
    t["dataset"] = cli("teach", "dataset", "export", str(out / "pairs.jsonl"), "-o", str(out / "train.jsonl"), cwd=work)
    ft.update(model=spec["model"], data=str(out / "train.jsonl"), output_dir=str(out / "finetune"), backend="torch")
    (out / "finetune.yaml").write_text(yaml.safe_dump(ft, sort_keys=False))
    t["finetune"] = cli("finetune", str(out / "finetune.yaml"), "--no-progress", cwd=work)
    t["export"] = cli("export", str(out / "finetune"), "--to", exp["to"], "--quant", exp["quant"],
                      "-o", str(out / "model.gguf"), cwd=work)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3, help="product sheets from examples/pipeline/docs")
    parser.add_argument("--steps", type=int, default=24, help="fine-tuning steps on both sides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lf-bench-pipeline-") as tmp:
        work = Path(tmp)
        spec = pipeline_file(work, args.docs, args.steps)
        total = cli("run", "pipeline.yaml", "--no-progress", cwd=work)
        manifest = json.loads((work / "run" / "manifest.json").read_text())
        stages = {n: r.get("seconds") for n, r in manifest["stages"].items() if r.get("seconds") is not None}
        again = cli("run", "pipeline.yaml", "--no-progress", cwd=work)
        hand = by_hand(work, spec)
    rows = [{"stage": n, "pipeline_s": stages.get(n), "by_hand_s": round(hand[n], 2) if n in hand else None}
            for n in (*MATCHED[:4], "eval", MATCHED[4])]
    matched_pipeline = sum(stages[n] for n in MATCHED)
    matched_hand = sum(hand.values())
    overhead = total - sum(stages.values())  # loading, checks and the manifest, outside the stages
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "docs": args.docs, "steps": args.steps, "stages": rows,
        "pipeline_total_s": round(total, 2), "pipeline_outside_stages_s": round(overhead, 2),
        "matched_pipeline_s": round(matched_pipeline, 2), "matched_by_hand_s": round(matched_hand, 2),
        "by_hand_over_pipeline": round(matched_hand / matched_pipeline, 3),
        "rerun_all_skipped_s": round(again, 2),
        "eval": manifest.get("eval"),
    }
    print(f"{'stage':<10}{'pipeline s':>12}{'by hand s':>12}")
    for r in rows:
        p = "-" if r["pipeline_s"] is None else f"{r['pipeline_s']:.1f}"
        h = "-" if r["by_hand_s"] is None else f"{r['by_hand_s']:.1f}"
        print(f"{r['stage']:<10}{p:>12}{h:>12}")
    print(f"matched stages: pipeline {matched_pipeline:.1f} s, by hand {matched_hand:.1f} s "
          f"(by hand / pipeline {result['by_hand_over_pipeline']:.2f}x; goal >= 0.95x)")
    print(f"pipeline in all {total:.1f} s ({overhead:.1f} s outside the stages); a re-run with nothing changed {again:.1f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
