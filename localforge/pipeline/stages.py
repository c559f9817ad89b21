"""The stages of a pipeline run. Each calls its job's own code on the previous stage's files; a
stage's ``inputs`` (files whose hashes decide it, with its settings) and ``outputs`` (what the
next stages read) are what ``run`` compares to skip it.

Each stage reports progress through ``ctx.progress`` and passes ``ctx.point()`` at a place where
its work is part-done and on disk: ``LOCALFORGE_PIPELINE_KILL=STAGE`` kills the process with
SIGKILL there (how the tests check that every stage resumes after kill -9).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localforge.pipeline.layout import Layout, read_rows
from localforge.pipeline.settings import PipelineSettings

KILL_ENV = "LOCALFORGE_PIPELINE_KILL"


@dataclass
class Outcome:
    summary: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # items that failed: a re-run retries them


@dataclass
class Context:
    settings: PipelineSettings
    layout: Layout
    documents: list[Path]
    on_event: Callable[..., None]
    train: Callable[..., dict]  # (run_dir, processes, on_event) -> the run's manifest
    stage: str = ""

    def progress(self, **data: Any) -> None:
        """completed / total / advance / info of the stage's bar."""
        self.on_event("progress", stage=self.stage, **data)

    def point(self) -> None:
        if os.environ.get(KILL_ENV) == self.stage:
            os.kill(os.getpid(), signal.SIGKILL)


def remove(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _sidecars(out: Path) -> list[Path]:
    from localforge.resumable import output_files

    return output_files(out)


# --- extract -------------------------------------------------------------------------------------


def extract_run(ctx: Context) -> Outcome:
    from localforge.extract.pipeline import run
    from localforge.extract.review import write_review

    L = ctx.layout

    def on_event(kind: str, **data) -> None:
        if kind == "document":
            ctx.progress(grow=data["chunks"], info=Path(data["path"]).name)
        elif kind == "chunk":
            ctx.progress(advance=1)
        elif kind == "failed":
            ctx.on_event("failed", stage=ctx.stage, reason=data["reason"])
        elif kind == "done":
            ctx.point()

    summary = run(ctx.documents, L.records, ctx.settings.extract, on_event)
    write_review(L.records, L.review)
    grounded, values = grounded_share(L.records)
    return Outcome({"documents": summary.documents, "done": summary.done + summary.skipped,
                    "failed": len(summary.failed), "records": _lines(L.records), "values": values,
                    "grounded": grounded, "rejected_chunks": summary.rejects,
                    "records_file": str(L.records), "review": str(L.review)},
                   [f"{p}: {why}" for p, why in summary.failed])


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.exists() else 0


def grounded_share(records: Path) -> tuple[int, int]:
    """(grounded values, values) over every record in the file (this run's and earlier ones')."""
    values = grounded = 0
    for line in records.read_text(encoding="utf-8").splitlines() if records.exists() else ():
        row = json.loads(line)
        for g in (row.get("_grounding") or {}).values():
            values += 1
            grounded += g.get("status") != "ungrounded"
    return grounded, values


# --- generate and dcr ----------------------------------------------------------------------------


def _batch_events(ctx: Context):
    def on_event(kind: str, **data) -> None:
        if kind == "start":
            ctx.progress(total=data["total"], completed=data["skipped"])
        elif kind == "item":
            ctx.progress(advance=1)
            if data["status"] == "failed":
                ctx.on_event("failed", stage=ctx.stage, reason=f"line {data['line']}: {data['reason']}")
            else:
                ctx.point()
    return on_event


def generate_run(ctx: Context) -> Outcome:
    from localforge.teach.generate import run

    L = ctx.layout
    s = run(L.records, L.pairs, ctx.settings.generate, _batch_events(ctx))
    return Outcome({"records": s.items, "done": s.done + s.skipped, "failed": len(s.failed), "unused": len(s.unused),
                    "pairs": _lines(L.pairs), "by_values": s.by_values,
                    "mean_quality": s.mean_quality, "pairs_file": str(L.pairs)},
                   [f"{L.records} line {line}: {why}" for line, why in s.failed])


def dcr_run(ctx: Context) -> Outcome:
    """teach dcr over the pairs: each pair's answer is the draft, its passages the evidence; the
    improved rows keep the pair's id and provenance (so the dataset traces back the same way)."""
    from localforge.teach.dataset import write_rows_atomic
    from localforge.teach.dcr import run

    L = ctx.layout
    rows = read_rows(L.pairs)
    write_rows_atomic(L.dcr_input, [{"id": r["id"], "instruction": r["instruction"], "draft": r["completion"],
                                     "evidence": r.get("evidence") or [], "provenance": r.get("provenance") or {}}
                                    for r in rows])
    s = run(L.dcr_input, L.improved, ctx.settings.dcr, _batch_events(ctx))
    return Outcome({"pairs": s.items, "done": s.done + s.skipped, "failed": len(s.failed),
                    "improved": _lines(L.improved), "improved_file": str(L.improved)},
                   [f"{L.dcr_input} line {line}: {why}" for line, why in s.failed])


# --- dataset -------------------------------------------------------------------------------------


def _record_of(row: dict) -> str:
    meta = row.get("metadata") or {}
    sources = (meta.get("provenance") or {}).get("sources") or []
    return str(sources[0].get("record_id")) if sources and sources[0].get("record_id") else str(meta.get("id"))


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def split_rows(rows: list[dict], holdout: float, valid: float, seed: int) -> dict[str, list[dict]]:
    """Rows into train, valid and test by pair: a pure function of (rows, shares, seed). Held-out
    pairs are taken first from records that keep another pair in training (the eval then asks other
    questions about facts the student was taught), then from the rest; train keeps at least one."""
    n = len(rows)
    want = {"test": round(n * holdout), "valid": round(n * valid)}
    if n - want["test"] - want["valid"] < 1:
        want["valid"] = max(0, n - 1 - want["test"])
        want["test"] = min(want["test"], n - 1)
    order = sorted(range(n), key=lambda i: _rank(seed, str((rows[i].get("metadata") or {}).get("id", i))))
    left: dict[str, int] = {}
    for i in order:
        left[_record_of(rows[i])] = left.get(_record_of(rows[i]), 0) + 1
    taken: dict[int, str] = {}
    for split in ("test", "valid"):
        for shared in (True, False):
            for i in order:
                if sum(v == split for v in taken.values()) >= want[split]:
                    break
                rec = _record_of(rows[i])
                if i in taken or (shared and left[rec] < 2):
                    continue
                taken[i] = split
                left[rec] -= 1
    out = {"train": [], "valid": [], "test": []}
    for i, row in enumerate(rows):
        out[taken.get(i, "train")].append(row)
    return out


def dataset_run(ctx: Context) -> Outcome:
    from localforge.teach.dataset import export, write_rows_atomic

    L, s = ctx.layout, ctx.settings.dataset
    source = L.improved if ctx.settings.dcr is not None else L.pairs
    L.dataset.mkdir(parents=True, exist_ok=True)
    every = L.split("all")
    summary = export(source, every, s.min_quality, s.format, s.sign)
    ctx.point()
    rows = read_rows(every)
    if not rows:
        from localforge.errors import ConfigError

        raise ConfigError(f"dataset: no pair of {source} ({summary.rows_in}) is left to train on "
                          f"({summary.below_quality} below dataset.min_quality {s.min_quality}, {summary.unscored} unscored): "
                          f"lower dataset.min_quality, or set it to null")
    splits = split_rows(rows, s.holdout, s.valid, s.seed)
    for name, part in splits.items():
        if part:
            write_rows_atomic(L.split(name), part)
        else:
            remove(L.split(name))
    return Outcome({"pairs_in": summary.rows_in, "kept": summary.written, "below_quality": summary.below_quality,
                    "unscored": summary.unscored, "signed_by": summary.key_id,
                    **{name: len(part) for name, part in splits.items()}, "folder": str(L.dataset)})


# --- finetune ------------------------------------------------------------------------------------


def finetune_config(ctx: Context) -> dict:
    """The finetune section as a `localforge finetune` config file of its own (written beside the run)."""
    return {**ctx.settings.section("finetune"), "data": str(ctx.layout.dataset), "output_dir": str(ctx.layout.run)}


def finetune_run(ctx: Context) -> Outcome:
    import yaml

    from localforge.finetune.run import RunDir, reopen, start

    L = ctx.layout
    run = RunDir(L.run)
    manifest = _json(run.manifest)
    if run.exists() and manifest.get("status") == "completed":
        pass  # finished before the kill that stopped the pipeline: nothing to train
    else:
        if run.exists():
            run, plan = reopen(L.run)
            processes = plan.processes
        else:
            L.finetune_config.write_text(yaml.safe_dump(finetune_config(ctx), sort_keys=False))
            run, prepared = start(L.finetune_config)
            processes = prepared.plan.processes
            ctx.on_event("plan", stage=ctx.stage, plan=prepared.plan.to_dict())

        def on_event(kind: str, **data) -> None:
            if kind == "start":
                ctx.progress(total=data["total"], completed=data["step"])
            elif kind == "step":
                ctx.progress(completed=data["step"], info=f"loss {data['loss']:.3f}")
            elif kind == "checkpoint":
                ctx.point()

        manifest = ctx.train(run.path, processes, on_event)
    return Outcome(finetune_summary(L.run, manifest))


def finetune_summary(run_dir: Path, manifest: dict) -> dict:
    from localforge.finetune.report import read_metrics

    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    metrics = manifest.get("metrics") or {}
    output = manifest.get("output") or {}
    return {"steps": metrics.get("steps"), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "eval_loss": metrics.get("final_eval_loss"),
            "backend": (manifest.get("config") or {}).get("backend"), "output": output.get("path"),
            "kind": output.get("kind", "adapter"), "run_dir": str(run_dir), "loss_png": str(run_dir / "loss.png")}


def finetune_output(run_dir: Path) -> Path:
    """What the finetune stage made: the adapter, or for full runs the model folder."""
    return run_dir / "model" if (run_dir / "model").is_dir() and not (run_dir / "adapter").is_dir() else run_dir / "adapter"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# --- eval and export -----------------------------------------------------------------------------


def eval_run(ctx: Context) -> Outcome:
    from localforge.pipeline.evaluate import evaluate

    report = evaluate(ctx)
    return Outcome(report)


def export_run(ctx: Context) -> Outcome:
    from localforge.export.job import export, plan

    L, s = ctx.layout, ctx.settings.export
    out = s.output(L.root)
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out.parent.glob(f".{out.name}.tmp-*"):  # an export killed part-way
        remove(leftover)
    p = plan(L.run, s.to, out, s.quant, s.name)

    def on_event(kind: str, **data) -> None:
        if kind == "step":
            ctx.progress(info=data.get("what", ""))
            ctx.point()

    result = export(p, on_event)
    return Outcome({"to": s.to, "path": str(result.path), "gguf": str(result.gguf) if result.gguf else None,
                    "bytes": result.bytes, "command": result.command})


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: Callable[[Context], list[Path]]  # files whose contents decide the stage, with its settings
    outputs: Callable[[Context], list[Path]]  # what later stages read (hashed into the manifest)
    clean: Callable[[Context], list[Path]]  # what a re-run from scratch removes first
    run: Callable[[Context], Outcome]


def _splits(ctx: Context) -> list[Path]:
    return [p for p in (ctx.layout.split(n) for n in ("train", "valid", "test")) if p.exists()]


def _export_out(ctx: Context) -> list[Path]:
    return [ctx.settings.export.output(ctx.layout.root)] if ctx.settings.export else []


STAGE_TABLE: dict[str, Stage] = {s.name: s for s in (
    Stage("extract", lambda c: list(c.documents), lambda c: [c.layout.records],
          lambda c: [*_sidecars(c.layout.records), c.layout.review], extract_run),
    Stage("generate", lambda c: [c.layout.records], lambda c: [c.layout.pairs],
          lambda c: _sidecars(c.layout.pairs), generate_run),
    Stage("dcr", lambda c: [c.layout.pairs], lambda c: [c.layout.improved],
          lambda c: [c.layout.dcr_input, *_sidecars(c.layout.improved)], dcr_run),
    Stage("dataset", lambda c: [c.layout.improved if c.settings.dcr is not None else c.layout.pairs], _splits,
          lambda c: [c.layout.dataset], dataset_run),
    Stage("finetune", _splits, lambda c: [finetune_output(c.layout.run)],
          lambda c: [c.layout.run, c.layout.finetune_config], finetune_run),
    Stage("eval", lambda c: [*_splits(c), finetune_output(c.layout.run),
                             *([Path(c.settings.eval.general)] if c.settings.eval.general else [])],
          lambda c: [c.layout.report], lambda c: [c.layout.eval], eval_run),
    Stage("export", lambda c: [finetune_output(c.layout.run)], _export_out,
          lambda c: [*_export_out(c), *(p for o in _export_out(c) for p in o.parent.glob(f".{o.name}.tmp-*"))],
          export_run),
)}
