"""`localforge run`: the whole chain on real parts. The teacher is the bundled SmolLM2 on llama.cpp
in-process (what `auto` picks for it), extracting from real Markdown files and writing pairs; the
student is the tiny random Llama (SmolLM2's tokenizer), so training, eval and export take seconds.

One uninterrupted run (module fixture) on two product sheets and a corrupt PDF is the reference:
the bad document fails the extract stage, the rest goes on. Then: unchanged stages are skipped and
a changed setting re-runs only the stages it affects; kill -9 in each stage, then a resume, ends
equal to the uninterrupted run; the same file runs with --backend mlx; trace walks a row back to
its span; bad input is one line before any folder is made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from localforge.pipeline.stages import KILL_ENV, split_rows
from tests.helpers import assert_one_line, cli_main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("falcon_r2.md", "heron_b4.md")
STAGES_RUN = ("extract", "generate", "dataset", "finetune", "eval", "export")


def _pipeline(folder: Path, student: str, **changes) -> Path:
    """A pipeline file in ``folder`` (documents in folder/docs), small enough for a test."""
    spec = {
        "documents": "docs",
        "fields": "product:str, maker:str, kind:str",
        "teacher": "smollm2-135m",
        "model": student,
        "backend": "auto",
        "output_dir": str(folder / "run"),
        "extract": {"chunk_size": 256},
        "generate": {"pairs_per_record": 2, "judge": False, "max_tokens": 64, "attempts": 3, "temperature": 0.7},
        "dataset": {"holdout": 0.25, "valid": 0.0},
        "finetune": {"steps": 3, "batch_size": 2, "grad_accum": 1, "max_seq_length": 128, "save_every": 1,
                     "eval_every": 10, "learning_rate": 1e-3, "lora": {"rank": 4, "alpha": 8}},
        "eval": {"max_tokens": 8, "general_limit": 3},
        "export": {"to": "hf"},
        **changes,
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _corpus(folder: Path, bad: bool = True) -> Path:
    docs = folder / "docs"
    docs.mkdir(parents=True)
    for name in DOCS:
        shutil.copy(ROOT / "examples" / "pipeline" / "docs" / name, docs / name)
    if bad:
        (docs / "broken.pdf").write_bytes(b"%PDF-1.7\n" + os.urandom(64))  # a PDF that is not one
    return folder


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localforge", "run", *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, **(env or {})})


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "run" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    """The uninterrupted run (through the CLI, as a user runs it)."""
    folder = _corpus(tmp_path_factory.mktemp("pipeline-ref"))
    pipeline = _pipeline(folder, tiny_llama)
    done = _cli(str(pipeline), "--backend", "torch")
    return folder, pipeline, done


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _essence(folder: Path) -> dict:
    """What a run made, without the times and paths that differ between two runs of it."""
    from safetensors.numpy import load_file

    run = folder / "run"
    records = [{k: v for k, v in r.items() if not k.startswith("_")} | {"_grounding": r["_grounding"]}
               for r in _rows(run / "records.jsonl")]
    pairs = [(p["id"], p["instruction"], p["completion"]) for p in _rows(run / "pairs.jsonl")]
    splits = {s: [r["messages"] for r in _rows(run / "dataset" / f"{s}.jsonl")]
              for s in ("train", "test") if (run / "dataset" / f"{s}.jsonl").exists()}
    adapter = load_file(str(run / "finetune" / "adapter" / "adapter_model.safetensors"))
    losses = [r["loss"] for r in _rows(run / "finetune" / "metrics.jsonl") if "loss" in r]
    report = json.loads((run / "eval" / "eval.json").read_text())
    answers = sorted((a["item"], a["answer"]) for a in _rows(run / "eval" / "answers.jsonl"))
    return {"records": sorted(records, key=json.dumps), "pairs": sorted(pairs), "splits": splits,
            "adapter": adapter, "losses": losses, "eval": {k: report[k] for k in ("base", "tuned", "forgetting")},
            "answers": answers, "export": sorted(p.name for p in (run / "export" / "hf").iterdir())}


def _same(a: dict, b: dict) -> None:
    for key in a:
        if key == "adapter":
            assert a[key].keys() == b[key].keys()
            # fp32 on a CPU: a resumed process may take other MKL kernel paths (its buffers align
            # differently), seen as 1.2e-6 on one of 256 weights of ~0.08 after 24 steps on an
            # AVX-512 VM; one Adam step at this learning rate (1e-3) moves a weight by up to 1e-3
            for name in a[key]:
                np.testing.assert_allclose(a[key][name], b[key][name], atol=1e-5, err_msg=name)
        elif key == "losses":
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
        else:
            assert a[key] == b[key], key


def test_the_whole_chain_with_a_bad_document(reference):
    folder, pipeline, done = reference
    assert done.returncode == 1, done.stderr[-3000:]  # the bad document: the rest went on
    m = _manifest(folder)
    assert m["status"] == "completed with failures"
    assert {n: r["status"] for n, r in m["stages"].items()} == {**dict.fromkeys(STAGES_RUN, "done"), "dcr": "off"}
    ex = m["stages"]["extract"]
    assert len(ex["failures"]) == 1 and "broken.pdf" in ex["failures"][0]
    assert ex["summary"]["done"] == 2 and ex["summary"]["records"] >= 2
    run = folder / "run"
    for rec in _rows(run / "records.jsonl"):  # every record grounded in its document
        text = (folder / "docs" / Path(rec["_provenance"]["source"]).name).read_text()
        for name, g in rec["_grounding"].items():
            if g["status"] == "exact":
                assert text[g["start"]:g["end"]] == rec[name]
    pairs = _rows(run / "pairs.jsonl")
    assert pairs and all(p["provenance"]["sources"] for p in pairs)
    ds = m["stages"]["dataset"]["summary"]
    assert ds["train"] >= 1 and ds["test"] >= 1 and ds["train"] + ds["test"] == len(pairs)
    ft = m["stages"]["finetune"]["summary"]
    assert ft["steps"] == 3 and ft["first_loss"] > 0 and (run / "finetune" / "adapter").is_dir()
    assert (run / "finetune" / "loss.png").stat().st_size > 0 and (run / "review.html").stat().st_size > 0
    ev = m["eval"]
    assert ev["base"]["heldout"] == ds["test"] and ev["base"]["general"] == 3 and ev["tuned"]["general"] == 3
    assert ev["base"]["value_recall"] is not None and ev["tuned"]["value_recall"] is not None
    assert json.loads((run / "eval" / "eval.json").read_text())["tuned"] == ev["tuned"]
    assert (run / "export" / "hf" / "config.json").is_file()
    for name, rec in m["stages"].items():  # every artefact linked to its inputs by hash
        if rec["status"] == "done":
            assert rec["inputs"] and all(len(h) == 64 for h in rec["inputs"].values()), name
            assert all(len(h) == 64 for h in rec["outputs"].values()), name
    for line in ("records", "pairs", "dataset", "train loss", "eval held-out", "eval general", "export"):
        assert line in done.stderr, line
    assert done.stdout.strip() == str(run)


def test_trace_walks_a_row_back_to_its_span(reference, monkeypatch, capsys):
    folder, _, _ = reference
    code, out, err = cli_main(monkeypatch, capsys, "run", "trace", str(folder / "run"), "1", "--json")
    assert code == 0, err
    chain = json.loads(out)
    row = _rows(folder / "run" / "dataset" / "train.jsonl")[0]
    assert chain["row"]["id"] == row["metadata"]["id"] and chain["pair"]["line"] >= 1
    assert chain["sources"], chain
    for src in chain["sources"]:
        assert src["record"]["line"] >= 1 and src["document_now"] == "unchanged"
        assert Path(src["document"]).name in DOCS
        if src["grounding"] == "exact":
            assert src["text"] == src["value"]
    code, out, _ = cli_main(monkeypatch, capsys, "run", "trace", str(folder / "run"), "test:1")
    assert code == 0 and out.startswith("row ") and "document " in out and "chars " in out
    code, _, err = cli_main(monkeypatch, capsys, "run", "trace", str(folder / "run"), "train:999")
    assert_one_line(code, err, 1, "train:999", "rows")


def test_unchanged_stages_skip_and_a_change_reruns_only_what_it_affects(reference, tmp_path):
    from localforge.pipeline.run import run

    folder, pipeline, _ = reference
    work = tmp_path / "copy"
    shutil.copytree(folder, work)  # the run folder moves with its documents: the hashes still hold
    copy = _pipeline(work, yaml.safe_load(pipeline.read_text())["model"])

    def statuses(*overrides: str) -> dict:
        seen = {}
        run(copy, list(overrides), {"backend": ("--backend", "torch")},
            on_event=lambda kind, **d: seen.update({d["stage"]: d["status"]}) if kind == "stage" else None)
        return seen

    # the bad document's failure is retried (extract runs), its records are unchanged: all else skips
    assert statuses() == {"extract": "done", "generate": "skip", "dcr": "off", "dataset": "skip",
                          "finetune": "skip", "eval": "skip", "export": "skip"}
    assert statuses("eval.max_tokens=4")["eval"] == "done"
    seen = statuses("eval.max_tokens=4", "finetune.steps=4")
    assert {k: seen[k] for k in STAGES_RUN[1:]} == {"generate": "skip", "dataset": "skip", "finetune": "done",
                                                    "eval": "done", "export": "done"}
    assert _manifest(work)["stages"]["finetune"]["summary"]["steps"] == 4
    seen = statuses("eval.max_tokens=4", "finetune.steps=4", "dataset.holdout=0.5")
    assert seen["dataset"] == "done" and seen["finetune"] == "done" and seen["generate"] == "skip"
    # --from re-runs from that stage; --until stops there
    seen = statuses("eval.max_tokens=4", "finetune.steps=4", "dataset.holdout=0.5")
    assert set(seen.values()) - {"skip", "off", "done"} == set() and seen["finetune"] == "skip"
    seen = {}
    run(copy, ["eval.max_tokens=4", "finetune.steps=4", "dataset.holdout=0.5"], start="eval", until="eval",
        on_event=lambda kind, **d: seen.update({d["stage"]: d["status"]}) if kind == "stage" else None)
    assert seen["eval"] == "done" and seen["finetune"] == "skip" and "export" not in seen


def test_kill_9_in_each_stage_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    folder, pipeline, _ = reference
    work = _corpus(tmp_path / "killed")
    path = _pipeline(work, yaml.safe_load(pipeline.read_text())["model"])
    for stage in STAGES_RUN:
        killed = _cli(str(path), "--backend", "torch", "--no-progress", env={KILL_ENV: stage})
        assert killed.returncode == -9, (stage, killed.stderr[-2000:])
        m = _manifest(work)
        assert m["status"] == "running" and m["stages"][stage]["status"] == "running", stage
    resumed = _cli(str(path), "--backend", "torch", "--no-progress")
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert _manifest(work)["status"] == "completed with failures"
    _same(_essence(folder), _essence(work))


def test_the_same_file_runs_on_mlx(reference, tmp_path):
    folder, pipeline, _ = reference
    work = _corpus(tmp_path / "mlx", bad=False)
    path = _pipeline(work, yaml.safe_load(pipeline.read_text())["model"])
    done = _cli(str(path), "--backend", "mlx", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    m = _manifest(work)
    assert m["stages"]["finetune"]["summary"]["backend"] == "mlx"
    assert (work / "run" / "finetune" / "adapter" / "adapters.safetensors").is_file()  # mlx-lm's format
    assert m["eval"]["backend"] == "mlx" and m["eval"]["tuned"]["general"] == 3
    assert (work / "run" / "export" / "hf" / "config.json").is_file()
    # extraction and the pairs are the teacher's, the same on both: the same records and pairs
    assert _rows(work / "run" / "pairs.jsonl") and \
        sorted(p["instruction"] for p in _rows(work / "run" / "pairs.jsonl")) == \
        sorted(p["instruction"] for p in _rows(folder / "run" / "pairs.jsonl"))


def test_split_is_deterministic_and_holds_out_other_questions_on_trained_records():
    rows = [{"messages": [], "metadata": {"id": f"r{r}-{q}", "provenance": {"sources": [{"record_id": f"r{r}"}]}}}
            for r in range(6) for q in range(2)]
    a, b = split_rows(rows, 0.25, 0.1, 0), split_rows(rows, 0.25, 0.1, 0)
    assert a == b and len(a["test"]) == 3 and len(a["valid"]) == 1 and len(a["train"]) == 8
    trained = {r["metadata"]["provenance"]["sources"][0]["record_id"] for r in a["train"]}
    assert all(r["metadata"]["provenance"]["sources"][0]["record_id"] in trained for r in a["test"])
    assert split_rows(rows, 0.25, 0.1, 1) != a
    assert split_rows(rows[:1], 0.5, 0.4, 0)["train"] == rows[:1]  # one pair: it is trained on


@pytest.mark.parametrize(("args", "code", "named"), [
    (["--from", "nowhere"], 2, ("--from", "nowhere")),
    (["--backend", "llamacpp"], 2, ("--backend",)),
    (["extract.chunk_size=0"], 1, ("extract.chunk_size",)),
    (["finetune.data=elsewhere"], 1, ("finetune.data", "remove it")),
    (["finetune.method=grpo"], 1, ("finetune.method",)),
    (["finetune.lora.targets=[nope]"], 1, ("finetune.lora.targets",)),
    (["documents=[missing/]"], 1, ("documents", "missing")),
    (["dataset.sign=true"], 1, ("dataset.sign", "LOCALFORGE_SIGNING_KEY")),
    (["dataset.holdout=0.7", "dataset.valid=0.3"], 1, ("dataset",)),
    (["export.to=zip"], 1, ("export", "zip")),
    (["eval.general=nothing.jsonl"], 1, ("eval.general",)),
    (["teacher.backend=nope"], 1, ("teacher.backend",)),
    (["teacher=nowhere/nothing"], 1, ("teacher", "nowhere/nothing", "offline")),
    (["teacher.backend=ollama", "teacher.base_url=http://127.0.0.1:9"], 1, ("teacher", "nothing answers", "127.0.0.1:9")),
    (["colour=blue"], 1, ("colour",)),
])
def test_bad_input_is_one_line_before_any_folder(tmp_path, tiny_llama, monkeypatch, capsys, args, code, named):
    monkeypatch.delenv("LOCALFORGE_SIGNING_KEY", raising=False)
    folder = _corpus(tmp_path, bad=False)
    path = _pipeline(folder, tiny_llama)
    got, _, err = cli_main(monkeypatch, capsys, "run", str(path), *args)
    assert_one_line(got, err, code, *named)
    assert not (folder / "run").exists()
