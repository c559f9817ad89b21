"""Config, data and the hardware planner (pure: tested with machines we do not have)."""

from __future__ import annotations

import json

import pytest

from localforge.errors import ConfigError
from localforge.finetune.config import load_config
from localforge.finetune.data import load_data
from localforge.finetune.planner import ModelShape, engine_problems, plan, predict_peak
from localforge.hardware import examples
from tests.helpers import run_cli

SMOL = ModelShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152)
LLAMA70 = ModelShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256,
                     tied_embeddings=False)
CONFIG = """model: smollm2-135m
data: data/
method: lora
lora: {rank: 8, alpha: 16, dropout: 0.0, targets: [q_proj, v_proj]}
steps: 100
batch_size: auto
learning_rate: 2.0e-4
max_seq_length: 512
seed: 0
eval_every: 50
save_every: 50
output_dir: runs/my-run
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n'
        '{"prompt": "2+2=", "completion": "4"}\n')
    (tmp_path / "data" / "valid.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "config.yaml").write_text(CONFIG)
    return tmp_path


def test_shapes_count_parameters():
    assert SMOL.params == 134_515_008  # SmolLM2-135M, as its weights have
    assert 70.0e9 < LLAMA70.params < 71.0e9


def test_the_issue_config_loads_with_overrides(project):
    cfg = load_config(project / "config.yaml", ["lora.rank=16", "steps=5", "lora.targets=[q_proj, k_proj]"])
    assert (cfg.lora.rank, cfg.steps, cfg.lora.targets, cfg.batch_size) == (16, 5, ["q_proj", "k_proj"], "auto")


@pytest.mark.parametrize("override, message", [
    ("method=qlora", "config key 'method': expected 'lora', 'dora', 'full' or 'grpo', got 'qlora'"),
    ("lora.rnk=3", "config key 'lora.rnk' is not known"),
    ("batch_size=big", "config key 'batch_size': expected a whole number or 'auto', got 'big'"),
    ("learning_rate=-1", "config key 'learning_rate': input should be greater than 0"),
    ("epochs=2", "config: give steps or epochs, not both"),
    ("nonsense", "override 'nonsense': write key=value"),
])
def test_bad_configs_name_the_key(project, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(project / "config.yaml", [override])


def test_bad_yaml_names_the_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: x\nlora: {rank: 8\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML \(line \d\)"):
        load_config(f)


def test_data_formats_and_bad_rows(project, tmp_path):
    ds = load_data(project / "data")
    assert ds.formats == {"train": ["chat", "completion"], "valid": ["text"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n{"foo": 1}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2: the last message must be the assistant's .* \(2 more bad rows\)"):
        load_data(bad)
    with pytest.raises(ConfigError, match="has no train.jsonl"):
        load_data(tmp_path)


@pytest.mark.parametrize("machine, backend, device, dtype, batch, processes, packing", [
    ("m3-max-128gb", "mlx", "metal", "bf16", 16, 1, False),
    ("1x-h100-80gb", "torch", "cuda", "bf16", 16, 1, True),
    ("4x-h100-80gb", "torch", "cuda", "bf16", 4, 4, True),
    ("cpu-laptop-16gb", "torch", "cpu", "fp32", 4, 1, True),
    ("cpu-xeon-bf16-32gb", "torch", "cpu", "bf16", 4, 1, True),
])
def test_plans_for_machines_we_do_not_have(project, machine, backend, device, dtype, batch, processes, packing):
    p = plan(examples()[machine], SMOL, load_config(project / "config.yaml"))
    assert (p.backend, p.device, p.dtype, p.batch_size, p.processes, p.packing) == \
        (backend, device, dtype, batch, processes, packing)
    # the same rows per optimizer step on every machine
    assert p.batch_size * p.grad_accum * p.processes == p.effective_batch == 16 and not p.gradient_checkpointing
    assert p.predicted_peak_bytes <= p.memory_budget_bytes


def test_effective_batch_is_the_configs_everywhere(project):
    for machine in examples():
        p = plan(examples()[machine], SMOL, load_config(project / "config.yaml", ["effective_batch=64"]))
        assert p.effective_batch == 64, machine
    h100 = plan(examples()["1x-h100-80gb"], SMOL, load_config(project / "config.yaml", ["effective_batch=64"]))
    assert (h100.batch_size, h100.grad_accum) == (64, 1)
    # an explicit batch larger than effective_batch: one micro-batch a step, and the plan says so
    big = plan(examples()["1x-h100-80gb"], SMOL, load_config(project / "config.yaml", ["batch_size=32"]))
    assert (big.batch_size, big.grad_accum, big.effective_batch) == (32, 1, 32)
    assert any("effective_batch 16" in r for r in big.reasons)


def test_bf16_on_a_cpu_only_where_it_has_the_instructions_and_not_for_grpo(project):
    xeon, laptop = examples()["cpu-xeon-bf16-32gb"], examples()["cpu-laptop-16gb"]
    assert plan(xeon, SMOL, load_config(project / "config.yaml")).dtype == "bf16"
    assert any("bf16 instructions" in r for r in plan(xeon, SMOL, load_config(project / "config.yaml")).reasons)
    assert plan(laptop, SMOL, load_config(project / "config.yaml")).dtype == "fp32"
    assert plan(xeon, SMOL, load_config(project / "config.yaml", ["method=grpo"])).dtype == "fp32"
    assert plan(xeon, SMOL, load_config(project / "config.yaml", ["dtype=fp32"])).dtype == "fp32"
    # mlx on a CPU keeps fp32 (no autocast there)
    assert plan(xeon, SMOL, load_config(project / "config.yaml", ["backend=mlx"])).dtype == "fp32"


def test_packing_auto_packs_where_the_engine_keeps_sequences_apart(project):
    laptop = examples()["cpu-laptop-16gb"]
    assert plan(laptop, SMOL, load_config(project / "config.yaml")).packing is True  # torch
    assert plan(laptop, SMOL, load_config(project / "config.yaml", ["backend=mlx"])).packing is False
    assert plan(laptop, SMOL, load_config(project / "config.yaml", ["backend=mlx", "packing=true"])).packing is True
    assert plan(laptop, SMOL, load_config(project / "config.yaml", ["packing=false"])).packing is False


def test_kernels_and_compile_are_the_engines_own_unless_asked_and_refused_where_they_cannot_run(project):
    """auto keeps torch's kernels and eager layers everywhere; liger is planned where asked and
    refused (naming the key) off CUDA, on a model type it is not wired for, for GRPO or on an
    engine without it; compile runs on torch's CUDA and CPU, not on MLX and not for GRPO."""
    h100, laptop = examples()["1x-h100-80gb"], examples()["cpu-laptop-16gb"]
    llama = ModelShape(**{**SMOL.__dict__, "model_type": "llama"})

    def problems(machine, *overrides, shape=llama):
        cfg = load_config(project / "config.yaml", list(overrides))
        p = plan(examples()[machine] if isinstance(machine, str) else machine, shape, cfg)
        return p, engine_problems(cfg, p, shape)

    for machine in (h100, laptop):
        p, found = problems(machine)
        assert (p.kernels, p.compile, found) == ("native", False, [])
    p, found = problems(h100, "kernels=liger", "compile=true")
    assert (p.kernels, p.compile, found) == ("liger", True, [])
    assert any("liger" in r and "RMSNorm" in r for r in p.reasons) and any("compile" in r for r in p.reasons)
    assert problems(laptop, "compile=true")[1] == []
    for machine, overrides, shape, want in [
        (laptop, ["kernels=liger"], llama, "liger's kernels run on cuda, and this run trains on cpu"),
        (h100, ["kernels=liger"], ModelShape(**{**SMOL.__dict__, "model_type": "gemma2"}), "this one is gemma2"),
        (h100, ["kernels=liger", "method=grpo"], llama, "GRPO takes its loss through TRL"),
        (laptop, ["kernels=liger", "backend=mlx"], llama, "MLX has no liger kernels"),
        (laptop, ["compile=true", "backend=mlx"], llama, "MLX compiles nowhere"),
        (h100, ["compile=true", "method=grpo"], llama, "a new shape each time"),
    ]:
        (key, what), = problems(machine, *overrides, shape=shape)[1]
        assert key == overrides[0].partition("=")[0] and want in what and what.endswith(": set " + key + ": auto")


def test_unpacked_batches_are_sized_by_the_longest_row(project):
    h100 = examples()["1x-h100-80gb"]
    cfg = load_config(project / "config.yaml", ["packing=false", "max_seq_length=2048"])
    unknown = plan(h100, SMOL, cfg)
    short = plan(h100, SMOL, cfg, longest=200)
    assert short.predicted_peak_bytes < unknown.predicted_peak_bytes / 4
    assert plan(h100, SMOL, cfg, longest=5000).predicted_peak_bytes == unknown.predicted_peak_bytes
    # packed rows fill max_seq_length whatever the longest row
    packed = load_config(project / "config.yaml", ["packing=true", "max_seq_length=2048"])
    assert plan(h100, SMOL, packed, longest=200).predicted_peak_bytes == plan(h100, SMOL, packed).predicted_peak_bytes


def test_a_70b_model_needs_checkpointing_and_says_when_it_cannot_fit(project):
    cfg = load_config(project / "config.yaml", ["max_seq_length=4096", "lora.rank=auto"])
    p = plan(examples()["1x-h100-80gb"], LLAMA70, cfg)
    assert p.batch_size == 1 and p.gradient_checkpointing and p.lora_rank == 32
    assert any("even batch 1 exceeds" in r for r in p.reasons)


def test_peak_grows_with_batch_and_shrinks_with_checkpointing():
    kw = dict(method="lora", dtype="fp32", seq=512, rank=8, targets=["q_proj", "v_proj"], layers=30,
              runtime_bytes=455 * 2**20)
    peaks = [predict_peak(SMOL, batch=b, checkpointing=False, **kw) for b in (1, 2, 4)]
    assert peaks == sorted(peaks)
    assert predict_peak(SMOL, batch=4, checkpointing=True, **kw) < peaks[-1]


def test_a_cpu_heap_adds_its_measured_share_to_fp32_activations_only():
    """On a CPU the heap keeps freed intermediates: fp32 activations count CPU_HEAP_FP32 more
    (measured, benchmarks/planner.py); bf16, and a GPU's prediction, are unchanged."""
    from localforge.finetune.planner import CPU_HEAP_FP32

    kw = dict(method="lora", seq=128, rank=8, targets=["q_proj", "v_proj"], layers=30, checkpointing=False,
              runtime_bytes=0, chunked_loss=True)
    small, big = (predict_peak(SMOL, dtype="fp32", batch=b, **kw) for b in (8, 16))
    small_h, big_h = (predict_peak(SMOL, dtype="fp32", batch=b, cpu_heap=True, **kw) for b in (8, 16))
    activations = 8 * 128 * SMOL.layers * (7 * SMOL.hidden + 3 * SMOL.kv_dim + 4 * SMOL.intermediate) * 4
    assert small_h - small == pytest.approx(CPU_HEAP_FP32 * activations, rel=1e-6)
    assert (big_h - small_h) == pytest.approx((big - small) + CPU_HEAP_FP32 * activations, rel=1e-6)
    assert predict_peak(SMOL, dtype="bf16", batch=8, cpu_heap=True, **kw) == predict_peak(SMOL, dtype="bf16",
                                                                                          batch=8, **kw)


def test_explicit_values_are_kept(project):
    cfg = load_config(project / "config.yaml", ["batch_size=2", "grad_accum=3", "backend=mlx", "dtype=fp32"])
    p = plan(examples()["4x-h100-80gb"], SMOL, cfg)
    assert (p.backend, p.batch_size, p.grad_accum, p.dtype) == ("mlx", 2, 3, "fp32")


@pytest.mark.slow
def test_dry_run_json(project, smol):
    out = run_cli("finetune", str(project / "config.yaml"), "--dry-run", "--json", "max_seq_length=256")
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    for key in ("backend", "dtype", "batch_size", "grad_accum", "gradient_checkpointing", "predicted_peak_bytes",
                "packing", "kernels", "compile"):
        assert key in p
    assert p["data"] == {"train": 2, "valid": 1} and p["model_params"] == SMOL.params
    bad = run_cli("finetune", str(project / "config.yaml"), "--dry-run", "method=qlora")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1


def test_processes_on_one_cpu_share_its_memory_and_the_effective_batch(project):
    laptop = examples()["cpu-laptop-16gb"]
    one = plan(laptop, SMOL, load_config(project / "config.yaml"))
    two = plan(laptop, SMOL, load_config(project / "config.yaml", ["num_processes=2"]))
    assert two.processes == 2 and two.memory_budget_bytes == one.memory_budget_bytes // 2
    assert two.batch_size * two.grad_accum * 2 >= 16 and two.grad_accum <= one.grad_accum
    gpus = plan(examples()["4x-h100-80gb"], SMOL, load_config(project / "config.yaml", ["num_processes=2"]))
    assert gpus.processes == 2 and gpus.memory_budget_bytes == plan(examples()["4x-h100-80gb"], SMOL, load_config(
        project / "config.yaml")).memory_budget_bytes  # each GPU has its own memory


@pytest.mark.parametrize("machine, backend, generations, length, batch, accum", [
    ("m3-max-128gb", "mlx", 8, 256, 4, 2),
    ("1x-h100-80gb", "torch", 8, 512, 8, 1),
    ("4x-h100-80gb", "torch", 8, 512, 8, 1),  # GRPO trains in one process
    ("cpu-laptop-16gb", "torch", 4, 128, 1, 4),
])
def test_grpo_plans_generations_length_and_batch_per_machine(project, machine, backend, generations, length,
                                                            batch, accum):
    cfg = load_config(project / "config.yaml", ["method=grpo"])
    p = plan(examples()[machine], SMOL, cfg)
    assert (p.backend, p.num_generations, p.max_completion_length, p.batch_size, p.grad_accum, p.processes) == \
        (backend, generations, length, batch, accum, 1)
    assert p.predicted_peak_bytes <= p.memory_budget_bytes
    assert any("generations per prompt" in r for r in p.reasons)


def test_grpo_peak_counts_generations_completions_and_the_reference():
    from localforge.finetune.planner import predict_grpo_peak

    kw = dict(dtype="fp32", prompts=1, prompt_len=128, rank=8, targets=["q_proj", "v_proj"], layers=30,
              checkpointing=False, runtime_bytes=0, beta=0.04)
    lora = [predict_grpo_peak(SMOL, method="lora", generations=g, completion_len=128, **kw) for g in (2, 4, 8)]
    assert lora == sorted(lora) and lora[0] < lora[-1]
    longer = predict_grpo_peak(SMOL, method="lora", generations=4, completion_len=512, **kw)
    assert longer > lora[1]
    # a full run keeps a second copy of the weights for the KL, LoRA switches its adapter off
    full = predict_grpo_peak(SMOL, method="full", generations=4, completion_len=128, **kw)
    full_no_kl = predict_grpo_peak(SMOL, method="full", generations=4, completion_len=128, **{**kw, "beta": 0.0})
    assert full - full_no_kl == SMOL.params * 4
    copy = predict_grpo_peak(SMOL, method="lora", generations=4, completion_len=128, reference_copy=True, **kw)
    assert copy - lora[1] == SMOL.params * 4
    # against SFT over the same tokens: logits only for the completions, plus sampling's KV cache
    sft = predict_peak(SMOL, method="lora", dtype="fp32", batch=4, seq=256, rank=8, targets=["q_proj", "v_proj"],
                       layers=30, checkpointing=False, runtime_bytes=0)
    kv = 4 * 256 * 30 * 2 * SMOL.kv_dim * 4
    assert lora[1] == sft - 4 * 128 * SMOL.vocab * 4 * 3 + kv
