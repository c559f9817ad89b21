"""The torch engine's options beyond its own eager kernels: ``compile: true`` (each decoder layer
through torch.compile) trains the losses the eager layers do, across a stop and resume, here on
the CPU (inductor's C++ kernels; the CUDA twins, and Liger's kernels, are in test_cuda.py); what
the machine lacks for them is one line naming the key, before any run folder exists. The
planner's side (auto, and refusals per device, engine and model) is in test_plan.py."""

from __future__ import annotations

import pytest
import yaml

from localforge.finetune.report import read_metrics
from localforge.finetune.run import TrainingInterrupted, start, train
from tests.helpers import TRAIN_ROWS, assert_one_line, cli_main, write_jsonl

CONFIG = {"method": "lora", "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
          "backend": "torch", "steps": 4, "batch_size": 2, "grad_accum": 1, "learning_rate": 1e-2,
          "lr_schedule": "constant", "max_seq_length": 128, "packing": True, "dtype": "fp32", "seed": 3,
          "save_every": 2, "eval_every": 1000}


def _project(tmp_path, model: str) -> str:
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", TRAIN_ROWS)  # no valid rows: no evaluation graphs
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"model": model, "data": "data/", **CONFIG}, sort_keys=False))
    return str(cfg)


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run.path / "metrics.jsonl") if "loss" in r]


def test_compiled_layers_train_the_eager_losses_and_resume_on_the_cpu(tmp_path, monkeypatch, tiny_llama):
    """Four packed LoRA steps eager, and compiled with a stop after two and a resume: the same
    losses (fp32; the compiled kernels only reorder float sums), graphs really compiled, and the
    run's config and plan say so. Packed rows take the per-sequence attention here (its threshold
    lowered to 0), which stays out of the graphs while the rest of each layer compiles."""
    torch = pytest.importorskip("torch")
    from torch._dynamo.utils import counters

    from localforge.backends.torch import attention

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(attention, "CPU_PER_SEQUENCE_FROM", 0)
    cfg = _project(tmp_path, tiny_llama)
    eager, _ = start(cfg, ["output_dir=runs/eager"])
    assert train(eager.path)["plan"]["compile"] is False
    counters.clear()
    compiled, _ = start(cfg, ["output_dir=runs/compiled", "compile=true"])
    try:
        with pytest.raises(TrainingInterrupted, match="stopped at step 2 of 4"):
            train(compiled.path, stop_after=2)
        manifest = train(compiled.path)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert manifest["status"] == "completed" and manifest["resumed_from"].endswith("step-00000002")
    assert manifest["plan"]["compile"] is True and manifest["config"]["compile"] is True
    assert graphs > 0  # the layers went through dynamo, with the attention left out
    want, got = _losses(eager), _losses(compiled)
    assert len(want) == len(got) == 4 and want[-1] != want[0]
    assert got == pytest.approx(want, rel=1e-4)


def test_what_the_machine_lacks_for_kernels_or_compiling_is_one_line_and_no_run(tmp_path, monkeypatch, capsys,
                                                                                 tiny_llama):
    """compile: true on a CPU without the C++ compiler inductor builds with (``$CXX``), and
    kernels: liger here (no CUDA): one line naming the key, exit 1, no run folder."""
    monkeypatch.chdir(tmp_path)
    cfg = _project(tmp_path, tiny_llama)
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    for override, named, why in [("compile=true", "compile", "no-such-c++-compiler, which this machine lacks"),
                                 ("kernels=liger", "kernels", "run on cuda, and this run trains on cpu")]:
        code, _, err = cli_main(monkeypatch, capsys, "finetune", cfg, override)
        assert_one_line(code, err, 1, f"config key '{named}'", why, f"set {named}: auto")
        assert not (tmp_path / "runs").exists()


def test_a_gpu_without_liger_kernel_is_told_what_to_install():
    """On a CUDA plan (this machine has none, so the plan is built by hand) ``kernels: liger``
    with liger-kernel missing names the package and the extra; the engine's own kernels need nothing."""
    from importlib.util import find_spec

    from localforge.finetune.planner import Plan
    from localforge.finetune.run import _toolchain_problems

    if find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    base = {"backend": "torch", "device": "cuda", "dtype": "bf16", "batch_size": 8, "grad_accum": 2, "lora_rank": 8,
            "lora_layers": 2, "gradient_checkpointing": False, "predicted_peak_bytes": 1, "memory_budget_bytes": 2}
    assert _toolchain_problems(Plan(**base, kernels="liger")) == [
        ("kernels", "liger needs liger-kernel, which is not installed here: pip install 'localforge[cuda]', "
                    "or set kernels: auto")]
    assert _toolchain_problems(Plan(**base)) == []


def test_a_resume_override_asking_for_kernels_the_run_cannot_have_is_refused(tmp_path, monkeypatch, capsys,
                                                                            tiny_llama):
    """``finetune resume RUN kernels=liger`` on a CPU run, and ``compile=true`` without the C++
    compiler: one line naming the override, and the run folder as it was (its config unchanged)."""
    monkeypatch.chdir(tmp_path)
    run, _ = start(_project(tmp_path, tiny_llama), ["steps=2", "output_dir=runs/r"])
    assert train(run.path)["status"] == "completed"
    before = (run.path / "config.yaml").read_text()
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    for override, why in [("kernels=liger", "run on cuda, and this run trains on cpu"),
                          ("compile=true", "no-such-c++-compiler, which this machine lacks")]:
        code, _, err = cli_main(monkeypatch, capsys, "finetune", "resume", str(run.path), "steps=4", override)
        assert_one_line(code, err, 1, f"override '{override}'", why)
        assert (run.path / "config.yaml").read_text() == before
