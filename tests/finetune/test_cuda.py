"""Fine-tuning and generation on an NVIDIA GPU: bf16 training, packed = unpacked loss (bf16 and
fp32), packed attention (FlashAttention varlen) = the masked SDPA, exact resume, Liger's kernels
and compiled layers = the eager kernels' losses, half-precision generation, the manifest's GPU
memory, and the allocator setting torch gets from localforge.

The device machine has neither network nor the bundled model, so every CUDA test builds its own
random Llama (``make_offline_llama``: its own byte-level BPE trained on arithmetic sentences, a
ChatML template) and writes its rows in the test. Each skips before it builds anything where
torch sees no GPU. One unmarked test runs the same project on the CPU, so the helper cannot rot
unseen between visits to a GPU; the allocator test needs no GPU either.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from localforge.finetune.report import read_metrics
from localforge.finetune.run import TrainingInterrupted, start, train
from tests.helpers import (
    assert_same_loss_and_grads,
    make_offline_llama,
    through_both_attentions,
    write_jsonl,
)

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# rows in the sentences the offline tokenizer was trained on: 15 tokens each, so 8 of them
# pack into one row of 256
ARITH = [{"prompt": f"What is {a} + {b}?", "completion": f" {a} + {b} = {a + b}. #### {a + b}"}
         for a, b in [(2, 3), (10, 7), (4, 4), (12, 29), (0, 9), (21, 5), (7, 18), (3, 3),
                      (15, 15), (6, 1), (28, 2), (9, 11), (1, 26), (19, 8), (5, 17), (13, 0)]]
BASE = {
    "method": "lora",
    "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": ALL_LINEARS},
    "backend": "torch",
    "steps": 10,
    "batch_size": 8,
    "grad_accum": 1,
    "learning_rate": 5e-3,  # the loss falls smoothly over 10 steps (2e-2 spikes on the way)
    "lr_schedule": "constant",
    "max_seq_length": 256,
    "dtype": "auto",
    "seed": 1,
    "eval_every": 1000,
    "save_every": 1000,
    "output_dir": "runs/run",
}


def _cuda():
    """Skip (before any model is built or fixture touched) where torch sees no NVIDIA GPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    return torch


def offline_project(tmp_path: Path, rows: list[dict], *, hidden: int = 256, layers: int = 4, **keys) -> Path:
    """A project in ``tmp_path``: the offline random Llama (built once per folder, at m/), ``rows``
    as data/train.jsonl, and config.yaml (``BASE`` with ``keys`` over it, the model filled in);
    the config's path. Runs go under ``tmp_path`` (the tests chdir there)."""
    model = tmp_path / "m"
    if not (model / "config.json").is_file():
        make_offline_llama(model, hidden=hidden, layers=layers)
    (tmp_path / "data").mkdir(exist_ok=True)
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(model), "data": "data/", **BASE, **keys}, sort_keys=False))
    return cfg


def metrics(run_dir: Path) -> list[dict]:
    """The per-step rows of metrics.jsonl (evaluation rows left out)."""
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _half(torch) -> str:
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@pytest.mark.cuda
def test_bf16_training_on_cuda_lowers_the_loss(tmp_path, monkeypatch):
    """dtype auto on a GPU is bf16 (fp16 on a card without it): ten LoRA steps on arithmetic rows
    bring the loss down from the random model's."""
    torch = _cuda()
    monkeypatch.chdir(tmp_path)
    run, _ = start(offline_project(tmp_path, ARITH))
    manifest = train(run.path)
    assert manifest["status"] == "completed"
    assert manifest["plan"]["device"] == "cuda" and manifest["plan"]["dtype"] == _half(torch)
    losses = [r["loss"] for r in metrics(run.path)]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] * 0.9, losses


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, rel", [("auto", 2e-2), ("fp32", 1e-4)])
def test_packed_and_unpacked_rows_give_the_same_first_loss_on_cuda(tmp_path, monkeypatch, dtype, rel):
    """The same 8 rows, one step, packed and not: the first step's loss (taken before any update)
    agrees within the precision's noise. Packed, the 8 short rows (15 tokens each) fit one row
    of 256 tokens, which the step's 8 row slots (batch 4, accumulation 2) repeat: 8 times the
    tokens and learned tokens of the unpacked step, whose 8 slots hold each row once. The
    layouts differ (one row of 8 sequences apart by position ids, against padded rows with an
    attention mask); the per-token mean must not."""
    torch = _cuda()
    monkeypatch.chdir(tmp_path)
    cfg = offline_project(tmp_path, ARITH[:8], steps=1, batch_size=4, grad_accum=2, learning_rate=1e-4,
                          dtype=dtype)
    first = {}
    for packing in (True, False):
        run, _ = start(cfg, [f"packing={str(packing).lower()}", f"output_dir=runs/packing-{packing}"])
        manifest = train(run.path)
        assert manifest["status"] == "completed" and manifest["plan"]["device"] == "cuda"
        assert manifest["plan"]["dtype"] == (_half(torch) if dtype == "auto" else "fp32")
        assert manifest["config"]["packing"] is packing
        (first[packing],) = metrics(run.path)
    packed, unpacked = first[True], first[False]
    assert packed["loss_tokens"] == 8 * unpacked["loss_tokens"] and packed["tokens"] == 8 * unpacked["tokens"], \
        (packed, unpacked)  # the layouts really differ: all 8 rows went into one packed row
    assert math.isfinite(unpacked["loss"]) and unpacked["loss"] > 1.0
    assert packed["loss"] == pytest.approx(unpacked["loss"], rel=rel)


@pytest.mark.cuda
def test_a_stopped_and_resumed_run_follows_the_straight_curve_on_cuda(tmp_path, monkeypatch):
    """Eight steps in one go, and four + four with a stop between (as Ctrl-C, through
    ``stop_after``): the same losses within the card's run-to-run noise in bf16, dropout on (the
    CUDA RNG travels in the checkpoint)."""
    _cuda()
    monkeypatch.chdir(tmp_path)
    cfg = offline_project(tmp_path, ARITH, steps=8, batch_size=4, grad_accum=2,
                          lora={"rank": 8, "alpha": 16, "dropout": 0.1, "targets": ALL_LINEARS})
    straight, _ = start(cfg, ["output_dir=runs/straight"])
    assert train(straight.path)["status"] == "completed"
    split, _ = start(cfg, ["output_dir=runs/split"])
    with pytest.raises(TrainingInterrupted, match="stopped at step 4 of 8"):
        train(split.path, stop_after=4)
    assert json.loads((split.path / "manifest.json").read_text())["status"] == "interrupted"
    resumed = train(split.path)
    assert resumed["status"] == "completed" and resumed["resumed_from"].endswith("step-00000004")
    assert resumed["plan"]["device"] == "cuda"
    a, b = [r["loss"] for r in metrics(straight.path)], [r["loss"] for r in metrics(split.path)]
    assert len(a) == len(b) == 8
    assert b == pytest.approx(a, rel=1e-2)
    assert resumed["metrics"]["final_train_loss"] == pytest.approx(a[-1], rel=1e-2)
    assert a[-1] != a[0]  # the weights moved: the comparison is on something


@pytest.mark.cuda
def test_packed_attention_on_cuda_is_the_block_masks_loss_and_gradients(tmp_path, monkeypatch):
    """Packed rows on a GPU in half precision go through FlashAttention's variable-length kernel
    (once per layer, over every sequence of the batch) where torch ships it and the card has it,
    else through the masked SDPA; either way the loss and the adapter's gradients are those of
    transformers' SDPA with the block-diagonal mask."""
    torch = _cuda()
    from localforge.backends.torch import attention
    from localforge.backends.torch.train import TorchTrainer
    from localforge.backends.training import TrainSetup
    from localforge.finetune.batches import collate, encode_all, pack
    from localforge.finetune.data import parse_row

    t = TorchTrainer(TrainSetup(model_path=make_offline_llama(tmp_path / "m", hidden=256, layers=4),
                                dtype=_half(torch), targets=ALL_LINEARS))
    enc = encode_all(t.tokenizer, [parse_row(r) for r in ARITH], mask_prompt=True, max_len=64)
    rows = pack(enc, 100)[:3]
    batch = collate(rows, t.tokenizer.pad_token_id, width=128)
    assert batch.packed and (batch.segment_ids == 0).any(axis=1).all()
    probe = torch.empty(1, 4, 2, 64, dtype=t.model.dtype, device="cuda")
    flash = attention.flash_varlen_applies(probe)
    ours, theirs, calls = through_both_attentions(t, batch, "_flash_varlen" if flash else "_per_sequence",
                                                  monkeypatch)
    sequences = sum(len(r) for r in rows) + len(rows)  # and each row's padding
    assert calls == ([sequences] * t.model.config.num_hidden_layers if flash else [])
    assert_same_loss_and_grads(ours, theirs, 2e-2)


@pytest.mark.cuda
def test_generation_on_cuda_runs_in_half_precision(tmp_path):
    """The torch backend on a GPU loads the model in bf16 (fp16 without it) and generates tokens
    (a random model's text is noise: only that it answered is checked)."""
    torch = _cuda()
    from localforge.backends import get_backend

    model = make_offline_llama(tmp_path / "m", hidden=256, layers=4)
    with get_backend("torch", model, device="cuda") as be:
        assert be.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[_half(torch)]
        result = be.chat([{"role": "user", "content": "What is 2 + 3?"}], max_tokens=8)
    assert isinstance(result.text, str)
    assert 0 < result.completion_tokens <= 8 and result.prompt_tokens > 0, result


@pytest.mark.cuda
def test_the_manifest_records_gpu_memory_on_cuda(tmp_path, monkeypatch):
    """``metrics.memory``: the plan's prediction beside what the card held. The rows fill
    max_seq_length (text rows cut at 512 tokens) and the batch is wide (64), so the activations
    the prediction counts (about 1.1 GB here, beside its 600 MiB runtime, which torch's reserved
    bytes do not see) are really there: within a factor 3 of the reserved peak, a bound that a
    prediction off by the activations' size fails."""
    _cuda()
    monkeypatch.chdir(tmp_path)
    sentence = " ".join(f"What is {a} + {b}? {a} + {b} = {a + b}. #### {a + b}" for a, b in ((3, 4), (11, 20), (8, 8)))
    rows = [{"text": f"{i}: " + " ".join([sentence] * 12)} for i in range(64)]
    cfg = offline_project(tmp_path, rows, steps=2, batch_size=64, grad_accum=1, max_seq_length=512,
                          gradient_checkpointing=False, learning_rate=1e-4)
    run, _ = start(cfg)
    manifest = train(run.path)
    assert manifest["status"] == "completed" and manifest["plan"]["device"] == "cuda"
    assert metrics(run.path)[0]["tokens"] == 64 * 512  # every row is full: the prediction's shape
    memory = manifest["metrics"]["memory"]
    assert memory["device"] == "cuda"
    assert memory["predicted_peak_bytes"] == manifest["plan"]["predicted_peak_bytes"] > 0
    for key in ("host_peak_rss_bytes", "peak_allocated_bytes", "peak_reserved_bytes"):
        assert isinstance(memory[key], int) and memory[key] > 0, (key, memory)
    assert memory["peak_allocated_bytes"] <= memory["peak_reserved_bytes"], memory
    nvml = memory["nvml_used_bytes"]
    assert nvml is None or (isinstance(nvml, int) and not isinstance(nvml, bool) and nvml > 0), memory
    ratio = memory["predicted_peak_bytes"] / memory["peak_reserved_bytes"]
    assert 1 / 3 <= ratio <= 3, (ratio, memory)


def _native_then(tmp_path, override: str, steps: int = 6) -> tuple[list[float], list[float], dict]:
    """The offline project, packed, in half precision, LoRA on every linear layer: ``steps``
    losses with the engine's own eager kernels, then with ``override``; and the second manifest."""
    cfg = offline_project(tmp_path, ARITH, steps=steps, batch_size=4, grad_accum=1, packing=True)
    runs = []
    for extra in ([], [override]):
        run, _ = start(cfg, [f"output_dir=runs/{len(runs)}", *extra])
        manifest = train(run.path)
        assert manifest["status"] == "completed" and manifest["plan"]["device"] == "cuda"
        runs.append(([r["loss"] for r in metrics(run.path)], manifest))
    (native, _), (other, manifest) = runs
    assert len(native) == len(other) == steps and native[-1] < native[0]
    return native, other, manifest


@pytest.mark.cuda
def test_liger_kernels_train_the_native_losses_on_cuda(tmp_path, monkeypatch):
    """kernels: liger (Liger's RMSNorm, rotary, SwiGLU and fused linear cross-entropy): the
    losses of the engine's own kernels within bf16's noise, Liger's norms really in the model,
    and transformers' classes back afterwards (the rotary function is the one swap that stays)."""
    _cuda()
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install 'localforge[cuda]')")
    from transformers.models.llama import modeling_llama

    monkeypatch.chdir(tmp_path)
    for name in ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb"):  # put back after the test
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    native, liger, manifest = _native_then(tmp_path, "kernels=liger")
    assert manifest["plan"]["kernels"] == "liger" and manifest["config"]["kernels"] == "liger"
    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    assert modeling_llama.LlamaRMSNorm.__module__.startswith("transformers")
    assert liger == pytest.approx(native, rel=3e-2)


@pytest.mark.cuda
def test_compiled_layers_train_the_eager_losses_on_cuda(tmp_path, monkeypatch):
    """compile: true on a GPU: packed rows through FlashAttention's variable-length kernel (left
    out of the graphs) and the rest of each layer compiled; the eager losses within bf16's noise."""
    torch = _cuda()
    from torch._dynamo.utils import counters

    monkeypatch.chdir(tmp_path)
    counters.clear()
    try:
        native, compiled, manifest = _native_then(tmp_path, "compile=true")
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert manifest["plan"]["compile"] is True and graphs > 0
    assert compiled == pytest.approx(native, rel=3e-2)


NO_CONF = {"PYTORCH_CUDA_ALLOC_CONF": None, "PYTORCH_ALLOC_CONF": None}
MINE = "max_split_size_mb:64"


@pytest.mark.parametrize("module, user, want", [
    ("localforge.backends.torch.generate", {}, {**NO_CONF, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    ("localforge.backends.torch.train", {}, {**NO_CONF, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    ("localforge.backends.torch.train", {"PYTORCH_CUDA_ALLOC_CONF": MINE}, {**NO_CONF, "PYTORCH_CUDA_ALLOC_CONF": MINE}),
    ("localforge.backends.torch.generate", {"PYTORCH_CUDA_ALLOC_CONF": MINE},
     {**NO_CONF, "PYTORCH_CUDA_ALLOC_CONF": MINE}),
    ("localforge.backends.torch.train", {"PYTORCH_ALLOC_CONF": MINE}, {**NO_CONF, "PYTORCH_ALLOC_CONF": MINE}),
], ids=["generate-unset", "train-unset", "train-user-cuda-alloc-conf", "generate-user-cuda-alloc-conf",
        "train-user-alloc-conf"])
def test_the_torch_engine_sets_expandable_segments_unless_the_user_chose_an_alloc_conf(module, user, want):
    """Loading the torch engine (its generation module, as ``get_backend`` does, or its trainer,
    as a run does) sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for the process, before
    torch's CUDA allocator reads it, unless the user set it or its newer name PYTORCH_ALLOC_CONF:
    then nothing changes. Needs no GPU: it is the environment."""
    env = {k: v for k, v in os.environ.items() if k not in NO_CONF}
    code = (f"import json, os, {module}; "
            f"print(json.dumps({{k: os.environ.get(k) for k in {tuple(NO_CONF)!r}}}))")
    done = subprocess.run([sys.executable, "-c", code], env={**env, **user}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == want


def test_the_offline_cuda_project_trains_on_the_cpu_too(tmp_path, monkeypatch):
    """The project the CUDA tests build (the offline Llama, the rows, the config) trains two fp32
    steps wherever this runs, so a change that breaks it shows here and not first on a GPU."""
    monkeypatch.chdir(tmp_path)
    run, _ = start(offline_project(tmp_path, ARITH, steps=2, dtype="fp32"))
    manifest = train(run.path)
    assert manifest["status"] == "completed" and manifest["plan"]["dtype"] == "fp32"
    assert manifest["plan"]["backend"] == "torch" and manifest["metrics"]["steps"] == 2
    losses = [r["loss"] for r in metrics(run.path)]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 1.0 for x in losses), losses
    assert (run.path / "adapter" / "adapter_model.safetensors").is_file()
