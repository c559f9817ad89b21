"""The hardware planner: a pure function from (hardware profile, model shape, config) to a plan.

It picks the backend, dtype, batch size, accumulation, LoRA rank and layers (when ``auto``) and
gradient checkpointing, and predicts the peak memory of one training process from a simple
model of what training holds: the weights, the trainable parameters with their gradients and
Adam states, the activations kept for the backward pass, the logits, and the runtime itself.
What it knows of engines (which train what, where they run, whether they run several
processes, what their runtime holds) it reads from their specs in the backend registry.
Pure, so it can be tested with profiles of machines we do not have.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from localforge.backends import REGISTRY, BackendUnavailable, EngineSpec, choose, spec, trainers
from localforge.backends.training import chunk_rows
from localforge.errors import ConfigError
from localforge.files import safetensors_header
from localforge.finetune.batches import bucket
from localforge.finetune.config import FinetuneConfig
from localforge.hardware import GiB, HardwareProfile

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BATCHES = (64, 32, 16, 8, 4, 2, 1)  # micro-batch sizes the planner tries, largest first


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = True
    context: int | None = None  # max_position_embeddings
    linears: tuple[tuple[str, int, int], ...] = ()  # the blocks' linear layers: (path, in, out)
    file_bytes: int = 0  # the weights on disk (safetensors), read whole while the model loads
    file_dtype_bytes: int = 4  # bytes per weight on disk
    model_type: str | None = None  # config.json's (llama, qwen2, ...)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def params(self) -> int:
        per_layer = (2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim
                     + 3 * self.hidden * self.intermediate + 2 * self.hidden)
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied_embeddings else 2) + self.layers * per_layer + self.hidden

    def module_dims(self, name: str) -> tuple[int, int]:
        """(in, out) features of the linear layer ``name`` of each block (read off the weights when known)."""
        for path, d_in, d_out in self.linears:
            if path == name or path.endswith("." + name):
                return d_in, d_out
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return dims.get(name, (h, h))  # a layer of a shape we were not told: estimate it square

    def missing_targets(self, targets: list[str]) -> list[str]:
        """The targets that name no linear layer of the model's blocks (none known: none missing)."""
        if not self.linears:
            return []
        return [t for t in targets if not any(p == t or p.endswith("." + t) for p, _, _ in self.linears)]

    @property
    def target_names(self) -> list[str]:
        return sorted({p.rsplit(".", 1)[-1] for p, _, _ in self.linears})

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelShape:
        cfg = json.loads((Path(path) / "config.json").read_text())
        return cls(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                   layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
                   kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                   vocab=cfg["vocab_size"], tied_embeddings=cfg.get("tie_word_embeddings", False),
                   context=cfg.get("max_position_embeddings"), model_type=cfg.get("model_type"),
                   **_weight_files(path))


_IN_BLOCK = re.compile(r"^.*?\.(\d+)\.(.+)\.weight$")  # model.layers.3.self_attn.q_proj.weight


def _headers(files: list[Path]) -> list[dict] | None:
    """The safetensors headers of ``files`` (no weights, no engine); None when one cannot be read."""
    try:
        return [safetensors_header(f)[1] for f in files]
    except (OSError, ValueError, struct.error):
        return None


def block_linears(headers: list[dict] | None) -> tuple[tuple[str, int, int], ...]:
    """The linear layers of a HF folder's blocks, as (path in the block, in, out), from its
    safetensors headers; () when there are none or one could not be read."""
    found: dict[str, tuple[int, int]] = {}
    for header in headers or ():
        for name, info in header.items():
            m = _IN_BLOCK.match(name)
            shape = info.get("shape") if isinstance(info, dict) else None
            if m and shape and len(shape) == 2:
                found.setdefault(m.group(2), (shape[1], shape[0]))
    return tuple((k, i, o) for k, (i, o) in sorted(found.items()))


SAFETENSORS_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _weight_files(folder: str | Path) -> dict:
    """What a HF folder's safetensors tell the shape, each header read once: the blocks' linear
    layers, the files' size and the bytes per weight of the first file's largest tensor."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return {}
    headers = _headers(files)
    out = {"linears": block_linears(headers), "file_bytes": sum(f.stat().st_size for f in files)}
    if headers:
        tensors = [v for k, v in headers[0].items() if k != "__metadata__" and isinstance(v, dict)]
        big = max(tensors, key=lambda v: math.prod(v.get("shape") or [0]), default={})
        out["file_dtype_bytes"] = SAFETENSORS_BYTES.get(big.get("dtype"), 4)
    return out


@dataclass
class Plan:
    backend: str
    device: str  # "cpu", "cuda", "metal", "mps"
    dtype: str
    batch_size: int
    grad_accum: int
    lora_rank: int | None
    lora_layers: int | None
    gradient_checkpointing: bool
    predicted_peak_bytes: int
    memory_budget_bytes: int
    processes: int = 1
    packing: bool = False
    effective_batch: int = 1  # rows (or packs) per optimizer step, over every process and micro-batch
    reasons: list[str] = field(default_factory=list)
    num_generations: int | None = None  # method grpo: completions sampled per prompt
    max_completion_length: int | None = None  # method grpo: tokens per completion, at most
    kernels: str = "native"  # the engine's own kernels, or a kernel set its spec names (liger)
    compile: bool = False  # each decoder layer through torch.compile

    def to_dict(self) -> dict:
        return asdict(self)


def _device(profile: HardwareProfile, engine: EngineSpec) -> str:
    """The engine's best device that this machine has."""
    return next((d for d in engine.devices if d in profile.devices), "cpu")


def _engine(profile: HardwareProfile, cfg: FinetuneConfig, available: dict[str, bool] | None,
            reasons: list[str]) -> EngineSpec:
    """The engine that trains: the config's, or the one ``auto`` means here; checked against its spec."""
    available = available if available is not None else {name: True for name in trainers()}
    if cfg.backend == "auto":
        name, why = choose(profile, available, train=cfg.method)
        reasons.append(f"backend {name} ({why})")
    else:
        name = cfg.backend
        if not available.get(name, False):
            extra = spec(name).extra
            raise BackendUnavailable(f"backend '{name}' is not installed here: pip install "
                                     f"{f'localforge[{extra}]' if extra else 'localforge'!r}")
    engine = spec(name)
    for method in dict.fromkeys((cfg.method, cfg.weights)):
        if method not in engine.methods:
            key = "method" if method == cfg.method else "grpo.train"
            raise ConfigError(f"config key '{key}': backend '{name}' trains {', '.join(engine.methods) or 'nothing'}, "
                              f"not '{method}'")
    return engine


def _dtype(profile: HardwareProfile, device: str, cfg: FinetuneConfig, engine: EngineSpec,
           reasons: list[str]) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    if device == "cuda":
        return "bf16" if all(a.bf16 for a in profile.cuda_devices) else "fp16"
    if device == "metal":
        return "bf16"
    if device == "cpu" and profile.cpu_bf16 and engine.cpu_bf16 and cfg.method != "grpo":
        # measured on a 2-core AVX512-BF16 EPYC (SmolLM2-135M LoRA): 2.38x fp32's tokens/s, and
        # the loss within 0.3% of fp32's at every one of 100 steps (benchmarks/precision.py)
        reasons.append("bf16 autocast with fp32 trainable weights: this CPU has bf16 instructions")
        return "bf16"
    return "fp32"  # other CPUs, MPS, and GRPO on a CPU (TRL samples in fp32 there) train in fp32


def _packing(cfg: FinetuneConfig, engine: EngineSpec, reasons: list[str]) -> bool:
    if cfg.method == "grpo":
        return False  # GRPO's rows are prompts, sampled into completions
    if cfg.packing != "auto":
        return bool(cfg.packing)
    if engine.exact_packing:
        reasons.append(f"packing: {engine.label} keeps packed sequences apart exactly (no padding to compute)")
    return engine.exact_packing


def planned_kernels(cfg: FinetuneConfig) -> str:
    """The kernels ``cfg`` trains with: auto keeps the engine's own. On an H100 (1.07B Llama
    shape, LoRA q,v, seq 512) TRL with Liger's kernels ran at 0.95x plain TRL's tokens/s, so
    Liger is planned only once it is measured to pay inside this engine (benchmarks/finetune.py:
    localforge-torch-liger)."""
    return "native" if cfg.kernels == "auto" else cfg.kernels


def planned_compile(cfg: FinetuneConfig) -> bool:
    """Whether ``cfg`` compiles its layers: auto is off. On 2-core CPUs (SmolLM2-135M LoRA, fp32,
    batch 2 x 256) compiled layers ran at 1.03x (AMD EPYC, after 63 s of compiling) and
    1.07-1.15x (Intel Xeon, 31 s the first time, 7 s from inductor's cache) the eager tokens/s,
    which a run of a hundred steps barely repays; where it pays on CUDA (small, launch-bound
    models) waits for a measurement on a card."""
    return cfg.compile is True


def _kernels(cfg: FinetuneConfig, engine: EngineSpec, reasons: list[str]) -> str:
    kernels = planned_kernels(cfg)
    if kernels in engine.kernels:
        reasons.append(f"kernels: {kernels}'s for {engine.kernels[kernels].replaces}")
    return kernels


def _compile(cfg: FinetuneConfig, reasons: list[str]) -> bool:
    if planned_compile(cfg):
        reasons.append("compile: each decoder layer through torch.compile (compiled at the first steps)")
    return planned_compile(cfg)


def _budget(profile: HardwareProfile, device: str) -> int:
    if device == "cuda":
        return int(min(a.memory_bytes for a in profile.cuda_devices) * 0.9)
    if device in ("metal", "mps"):
        return int(profile.memory_bytes * 0.7)  # Metal's default working-set limit is about 70-75%
    return int(profile.available_memory_bytes * 0.8)


def trainable_params(shape: ModelShape, method: str, rank: int, targets: list[str], layers: int) -> int:
    if method == "full":
        return shape.params
    per_layer = sum(rank * sum(shape.module_dims(t)) for t in targets)
    if method == "dora":
        per_layer += sum(shape.module_dims(t)[1] for t in targets)  # the magnitude vectors
    return per_layer * layers


# What the process holds on a CPU beyond the fp32 activations counted for backward: the C heap
# keeps the memory of the forward pass's intermediates and of backward's gradients once freed,
# and the next step reuses it rather than giving it back (measured on the 2-core AVX2 VM, glibc,
# SmolLM2-135M LoRA fp32, batches 8 to 64 of 128 tokens: 1.59 MiB per token against the 1.23
# counted, packed and padded alike; forcing large blocks back to the system with mallopt cut
# the peak by 22% but slowed a step by 43%). bf16 (activations half the size) measured within
# 7% without it on the AVX512-BF16 VM.
CPU_HEAP_FP32 = 0.29


def load_peak(shape: ModelShape, dtype: str, method: str, runtime_bytes: int) -> int:
    """The host memory of loading the weights: the files are read (mapped) whole, and a dtype
    other than theirs is a second copy beside them (measured on this CPU: SmolLM2's 540 MB of fp32
    files loaded as bf16 peak at 1.19 GiB with the runtime)."""
    b = 4 if method == "full" else DTYPE_BYTES[dtype]
    copy = shape.params * b if b != shape.file_dtype_bytes else 0
    return int(runtime_bytes + max(shape.file_bytes, shape.params * shape.file_dtype_bytes) + copy)


def predict_peak(shape: ModelShape, *, method: str, dtype: str, batch: int, seq: int, rank: int,
                 targets: list[str], layers: int, checkpointing: bool, runtime_bytes: int,
                 host: bool = False, chunked_loss: bool = False, cpu_heap: bool = False) -> int:
    """The peak of a training step; ``host``: the weights load into this memory too (a CPU, or
    Apple's unified memory), so the peak is at least ``load_peak``'s; ``chunked_loss``: the
    engine holds one chunk of logits at a time (``training.chunk_rows``); ``cpu_heap``: the step
    runs on a CPU, whose heap holds more than the live tensors (``CPU_HEAP_FP32``)."""
    if host:
        return max(load_peak(shape, dtype, method, runtime_bytes),
                   predict_peak(shape, method=method, dtype=dtype, batch=batch, seq=seq, rank=rank,
                                targets=targets, layers=layers, checkpointing=checkpointing,
                                runtime_bytes=runtime_bytes, chunked_loss=chunked_loss, cpu_heap=cpu_heap))
    b = DTYPE_BYTES[dtype]
    weights = shape.params * (4 if method == "full" and dtype == "bf16" else b)  # full bf16: fp32 master weights
    trainable = trainable_params(shape, method, rank, targets, layers)
    # grads, Adam m and v in fp32; a full bf16 run also keeps autocast's bf16 copy of the weights
    optimizer = trainable * 4 * 3 + (trainable * 2 if method == "full" and dtype == "bf16" else 0)
    tokens = batch * seq
    # kept per token and layer for backward: layer inputs, q/k/v and the rotary copies of q and
    # k, attention output, MLP in/out and its gate/up/activation. The engines use fused
    # attention (SDPA, mx.fast), which keeps no seq x seq probabilities (measured on this CPU:
    # 1.89 MB per token for SmolLM2 fp32 LoRA against 1.88 predicted)
    per_token_layer = (7 * shape.hidden + 3 * shape.kv_dim + 4 * shape.intermediate) * b
    if b < 4:
        # RMSNorm computes in fp32 whatever the dtype and keeps fp32 copies of its input for
        # backward (measured on this CPU, bf16 autocast: 1.46 MB per token for SmolLM2 LoRA
        # against 1.23 predicted without them, 1.51 with)
        per_token_layer += 4 * shape.hidden * 4
    if checkpointing:
        activations = tokens * shape.layers * shape.hidden * b + tokens * per_token_layer
    else:
        activations = tokens * shape.layers * per_token_layer
    if cpu_heap and b == 4:
        activations *= 1 + CPU_HEAP_FP32
    # logits, log-softmax and their gradient, in fp32; a chunked loss holds one chunk's, and the
    # hidden states' gradient it computes on the way
    logits = (min(tokens, chunk_rows(shape.vocab)) * shape.vocab * 4 * 3 + tokens * shape.hidden * b
              if chunked_loss else tokens * shape.vocab * 4 * 3)
    return int(weights + optimizer + activations + logits + runtime_bytes)


def predict_grpo_peak(shape: ModelShape, *, method: str, dtype: str, prompts: int, generations: int,
                      prompt_len: int, completion_len: int, rank: int, targets: list[str], layers: int,
                      checkpointing: bool, runtime_bytes: int, beta: float, reference_copy: bool = False) -> int:
    """Peak memory of one GRPO micro-batch: ``prompts`` x ``generations`` sequences of
    ``prompt_len + completion_len`` tokens through the policy with gradients (as SFT over that
    batch, logits for the completion tokens only), the reference's forward for the KL (no copy
    for LoRA: the adapter is switched off; a second set of weights for full with ``beta > 0``),
    and sampling's KV cache over the whole generation batch."""
    rows = prompts * generations
    seq = prompt_len + completion_len
    b = DTYPE_BYTES[dtype]
    train = predict_peak(shape, method=method, dtype=dtype, batch=rows, seq=seq, rank=rank, targets=targets,
                         layers=layers, checkpointing=checkpointing, runtime_bytes=runtime_bytes)
    train -= rows * seq * shape.vocab * 4 * 3  # predict_peak's logits are over every token
    logits = rows * completion_len * shape.vocab * 4 * 3
    reference = shape.params * b if (method == "full" or reference_copy) and beta > 0 else 0
    kv_cache = rows * seq * shape.layers * 2 * shape.kv_dim * b
    return int(train + logits + reference + kv_cache)


def _grpo_sizes(device: str, cfg: FinetuneConfig, reasons: list[str]) -> tuple[int, int]:
    """Generations per prompt and completion length: the config's, or what ``auto`` means here."""
    g = cfg.grpo
    generations, length = g.num_generations, g.max_completion_length
    if generations == "auto":
        generations = 8 if device in ("cuda", "metal") else 4
        reasons.append(f"{generations} generations per prompt ({'an accelerator' if generations == 8 else 'a CPU'}: "
                       f"{'wider groups give steadier advantages' if generations == 8 else 'sampling dominates a step'})")
    if length == "auto":
        length = 512 if device == "cuda" else 256 if device == "metal" else 128
        reasons.append(f"completions of at most {length} tokens on {device}")
    return int(generations), int(length)


def plan(profile: HardwareProfile, shape: ModelShape, cfg: FinetuneConfig,
         available: dict[str, bool] | None = None, longest: int | None = None) -> Plan:
    """Choose everything ``auto`` in ``cfg`` for ``profile``; explain each choice in ``reasons``.

    ``available`` maps backend names to whether they are installed (default: every engine that
    trains, for planning machines we do not have). ``longest``: the longest training row in
    tokens, when the data has been read; unpacked batches are at most that wide, so the
    predicted peak is of that width instead of ``max_seq_length``.
    """
    reasons: list[str] = []
    engine = _engine(profile, cfg, available, reasons)
    device = _device(profile, engine)
    dtype = _dtype(profile, device, cfg, engine, reasons)
    packing = _packing(cfg, engine, reasons)
    kernels, compiled = _kernels(cfg, engine, reasons), _compile(cfg, reasons)
    processes = cfg.num_processes
    if processes == "auto":
        several = device == "cuda" and engine.multi_process and cfg.method != "grpo"  # GRPO: one process
        processes = max(1, len(profile.cuda_devices)) if several else 1
        if processes > 1:
            reasons.append(f"{processes} processes, one per GPU (DDP through accelerate)")
    processes = int(processes)
    if processes > 1 and not engine.multi_process:
        several = [n for n, s in REGISTRY.items() if s.trains and s.multi_process]
        raise ConfigError(f"num_processes={processes}: {engine.label} trains in one process here; several "
                          f"processes run on {' or '.join(several)} (--backend {several[0]}), through accelerate")

    rank = cfg.lora.rank
    if rank == "auto":
        rank = 8 if shape.params < 1e9 else 16 if shape.params < 10e9 else 32
        reasons.append(f"LoRA rank {rank} for {shape.params / 1e9:.2f}B parameters")
    layers = cfg.lora.layers
    if layers in (None, "auto"):
        layers = shape.layers
    layers = min(int(layers), shape.layers)

    budget = _budget(profile, device)
    if device != "cuda":
        budget //= processes  # processes on one CPU or Apple GPU share its memory
    cap = 64 if device == "cuda" else 16 if device == "metal" else 4
    # the same rows per optimizer step on every machine: a config trains alike on a laptop and a cluster
    target = cfg.effective_batch if cfg.method != "grpo" else 4 if device == "cpu" else 8  # grpo: prompts
    cap = max(1, min(cap, target // processes))
    seq = cfg.max_seq_length
    if longest is not None and not packing:
        seq = min(seq, bucket(longest, seq))  # an unpacked batch is as wide as its longest row's bucket

    generations = completion = None
    if cfg.method == "grpo":
        generations, completion = _grpo_sizes(device, cfg, reasons)
        cap = 8 if device == "cuda" else 4 if device == "metal" else 1  # prompts per micro-batch

    def peak(batch: int, ckpt: bool) -> int:
        if cfg.method == "grpo":
            return predict_grpo_peak(shape, method=cfg.weights, dtype=dtype, prompts=batch, generations=generations,
                                     prompt_len=cfg.grpo.max_prompt_length, completion_len=completion,
                                     rank=int(rank), targets=cfg.lora.targets, layers=layers, checkpointing=ckpt,
                                     runtime_bytes=engine.runtime_bytes.get(device, 0), beta=cfg.grpo.beta,
                                     reference_copy=engine.grpo_reference_copy)
        return predict_peak(shape, method=cfg.method, dtype=dtype, batch=batch, seq=seq,
                            rank=int(rank), targets=cfg.lora.targets, layers=layers, checkpointing=ckpt,
                            runtime_bytes=engine.runtime_bytes.get(device, 0), host=device != "cuda",
                            chunked_loss=engine.chunked_loss, cpu_heap=device == "cpu")

    candidates = [b for b in BATCHES if b <= cap]
    ckpt_options = [cfg.gradient_checkpointing] if isinstance(cfg.gradient_checkpointing, bool) else [False, True]
    batch, ckpt = None, ckpt_options[0]
    if cfg.batch_size != "auto":
        batch = int(cfg.batch_size)
        ckpt = next((c for c in ckpt_options if peak(batch, c) <= budget), ckpt_options[-1])
    else:
        for c in ckpt_options:  # prefer no checkpointing (faster) when a batch fits without it
            batch = next((b for b in candidates if peak(b, c) <= budget), None)
            if batch is not None:
                ckpt = c
                break
        if batch is None:
            batch, ckpt = 1, ckpt_options[-1]
            reasons.append("even batch 1 exceeds the memory budget: expect swapping or out-of-memory")
        reasons.append(f"batch {batch}: the largest of {candidates} whose predicted peak fits "
                       f"{budget / GiB:.1f} GiB")
    if ckpt and cfg.gradient_checkpointing == "auto":
        reasons.append("gradient checkpointing on: activations would not fit otherwise")
    accum = cfg.grad_accum
    if accum == "auto":
        accum = max(1, math.ceil(target / (batch * processes)))
        reasons.append(f"accumulation {accum}: effective batch {batch * processes * accum}"
                       + (f" (effective_batch {target})" if batch * processes * accum != target else ""))
    return Plan(backend=engine.name, device=device, dtype=dtype, batch_size=batch, grad_accum=int(accum),
                lora_rank=None if cfg.weights == "full" else int(rank),
                lora_layers=None if cfg.weights == "full" else layers,
                gradient_checkpointing=ckpt, predicted_peak_bytes=peak(batch, ckpt),
                memory_budget_bytes=budget, processes=processes, packing=packing,
                effective_batch=batch * processes * int(accum), reasons=reasons,
                num_generations=generations, max_completion_length=completion, kernels=kernels, compile=compiled)


def model_problems(cfg: FinetuneConfig, shape: ModelShape) -> list[tuple[str, str]]:
    """What in ``cfg`` the model cannot do, as (config key, what is wrong): LoRA targets it lacks,
    more LoRA layers than it has, a max_seq_length beyond its context."""
    out = []
    if cfg.weights != "full":
        missing = shape.missing_targets(list(cfg.lora.targets))
        if missing:
            out.append(("lora.targets", f"{missing[0]!r} is not a linear layer of this model's blocks: choose "
                                        f"from {', '.join(shape.target_names)}"))
        if isinstance(cfg.lora.layers, int) and cfg.lora.layers > shape.layers:
            out.append(("lora.layers", f"{cfg.lora.layers} is more than the model's {shape.layers} layers: give "
                                       f"{shape.layers} or less (or leave it out to adapt them all)"))
    g = cfg.grpo
    if g is not None and shape.context and isinstance(g.max_completion_length, int) \
            and g.max_prompt_length + g.max_completion_length > shape.context:
        out.append(("grpo.max_completion_length", f"max_prompt_length {g.max_prompt_length} + max_completion_length "
                                                  f"{g.max_completion_length} is more than the model's context of "
                                                  f"{shape.context} tokens: lower one of them"))
    if shape.context and cfg.max_seq_length > shape.context:
        out.append(("max_seq_length", f"{cfg.max_seq_length} is more than the model's context of {shape.context} "
                                      f"tokens: give {shape.context} or less"))
    return out


def engine_problems(cfg: FinetuneConfig, p: Plan, shape: ModelShape) -> list[tuple[str, str]]:
    """What in ``cfg`` the planned engine cannot do on the planned device, as (config key, what is
    wrong): a kernel set it lacks, or one for another device or model type; compiling where it
    does not compile, or for GRPO (whose sampling changes shapes at every token)."""
    engine, out = spec(p.backend), []
    if p.kernels != "native":
        ks = engine.kernels.get(p.kernels)
        if ks is None:
            out.append(("kernels", f"{engine.label} has no {p.kernels} kernels: set kernels: auto"))
        elif cfg.method == "grpo":
            out.append(("kernels", f"{p.kernels} is for lora, dora and full runs (GRPO takes its loss through "
                                   f"TRL): set kernels: auto"))
        elif p.device not in ks.devices:
            out.append(("kernels", f"{p.kernels}'s kernels run on {' or '.join(ks.devices)}, and this run trains "
                                   f"on {p.device}: set kernels: auto"))
        elif shape.model_type not in ks.model_types:
            out.append(("kernels", f"{p.kernels} is wired here for {', '.join(sorted(ks.model_types))} models, and "
                                   f"this one is {shape.model_type or 'of no model_type'}: set kernels: auto"))
    if p.compile:
        if p.device not in engine.compiles:
            where = f"on {' or '.join(engine.compiles)}" if engine.compiles else "nowhere"
            out.append(("compile", f"{engine.label} compiles {where}, and this run trains on {p.device}: "
                                   f"set compile: auto"))
        elif cfg.method == "grpo":
            out.append(("compile", "GRPO samples its completions a token at a time, a new shape each time: "
                                   "set compile: auto"))
    return out


def over_budget(p: Plan, cfg: FinetuneConfig) -> tuple[str, str] | None:
    """(config key, what is wrong) when the plan's predicted peak exceeds its memory budget."""
    if p.predicted_peak_bytes <= p.memory_budget_bytes:
        return None
    if cfg.method == "grpo":
        key = "batch_size" if cfg.batch_size != "auto" else "grpo.max_completion_length"
        return key, (f"predicted peak {p.predicted_peak_bytes / GiB:.1f} GiB exceeds the {p.memory_budget_bytes / GiB:.1f} "
                     f"GiB memory budget ({p.device}) at batch_size {p.batch_size} with {p.num_generations} generations "
                     f"of {p.max_completion_length} tokens: lower batch_size, grpo.num_generations or "
                     f"grpo.max_completion_length, or pass --force to start anyway")
    key = "batch_size" if cfg.batch_size != "auto" else "max_seq_length"
    ckpt = "" if p.gradient_checkpointing else ", set gradient_checkpointing: true"
    return key, (f"predicted peak {p.predicted_peak_bytes / GiB:.1f} GiB exceeds the {p.memory_budget_bytes / GiB:.1f} "
                 f"GiB memory budget ({p.device}) at batch_size {p.batch_size}, max_seq_length {cfg.max_seq_length}: "
                 f"lower batch_size or max_seq_length{ckpt}, or pass --force to start anyway")
