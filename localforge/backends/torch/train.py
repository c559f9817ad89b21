"""The torch training engine: PEFT LoRA/DoRA (or full fine-tuning) with a lean loop.

No Trainer class in between: forward, a summed cross-entropy over the learned tokens divided
by the step's token count, backward, clip, AdamW. Launched by ``accelerate launch`` with
several processes, it wraps the model in DDP through ``accelerate.Accelerator`` (gloo on CPU,
NCCL on CUDA); alone it runs plain torch. Packed rows go in with ``position_ids`` that restart
per sequence and the sequences' bounds, and each sequence attends to itself alone (attention.py).

The registry imports this module (the spec's ``trainer``) only when torch trains.
"""

from __future__ import annotations

import os
import random
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from localforge.backends.hf import NO_HUB_KERNELS, load_tokenizer, quiet_transformers
from localforge.backends.torch import prefer_expandable_segments
from localforge.backends.torch.generate import pick_device, pick_dtype
from localforge.backends.training import (
    IGNORE,
    PLAIN_HEADS,
    Batch,
    CorruptCheckpoint,
    PromptBatch,
    TrainSetup,
    chunk_rows,
    read_checkpoint_file,
)
from localforge.errors import ConfigError
from localforge.hardware import default_threads, run_tool

prefer_expandable_segments()  # before torch starts its CUDA allocator

import torch  # noqa: E402

from localforge.backends.torch.attention import sequence_bounds, use_packed_attention  # noqa: E402
from localforge.backends.torch.kernels import (  # noqa: E402
    apply_liger,
    compile_layers,
    liger_linear_cross_entropy,
)


class TorchTrainer:
    def __init__(self, setup: TrainSetup):
        from transformers import AutoModelForCausalLM

        self.setup = setup
        torch.set_num_threads(setup.threads or default_threads())
        quiet_transformers()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = None
        if self.world_size > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            self.device = self.accelerator.device
        else:
            self.device = torch.device(pick_device())
        self.rank = self.accelerator.process_index if self.accelerator else 0
        _seed_everything(setup.seed)
        self.tokenizer = load_tokenizer(setup.model_path)
        # bf16 is mixed precision: matmuls in bf16 under autocast, trainable weights (LoRA's, or
        # every weight of a full run) and their Adam states in fp32; a LoRA run's frozen base is
        # held in bf16, since nothing updates it
        self.autocast = setup.dtype == "bf16"
        load_dtype = torch.float32 if self.autocast and setup.method == "full" else pick_dtype(str(self.device), setup.dtype)
        model = AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=load_dtype, **NO_HUB_KERNELS)
        if setup.kernels == "liger":
            apply_liger(model)
        elif setup.kernels != "native":
            raise ConfigError(f"config key 'kernels': torch has no {setup.kernels} kernels: set kernels: auto")
        self.packed_attention = use_packed_attention(model)  # packed rows: each sequence attends alone
        if setup.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if setup.method != "full":
            model = self._with_lora(model)
        self.model = model.to(self.device).train()
        if setup.compile:
            compile_layers(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in self.params)
        self.total_params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, weight_decay=setup.weight_decay)
        self.loss = LearnedTokenLoss(self.model, liger=setup.kernels == "liger")
        self.wrapped = self.loss  # what training calls: under DDP the wrapper, evaluation keeps the bare module
        if self.accelerator:
            self.wrapped, self.optimizer = self.accelerator.prepare(self.loss, self.optimizer)
        self.grpo = None
        if setup.grpo is not None:
            if self.world_size > 1:
                raise ConfigError("method grpo trains in one process on torch here: set num_processes: 1")
            from localforge.backends.torch.grpo import TRLGrpo

            self.grpo = TRLGrpo(self, setup.grpo)  # before any checkpoint loads: TRL seeds the process

    def _with_lora(self, model):
        from peft import LoraConfig, get_peft_model

        s = self.setup
        layers = model.config.num_hidden_layers
        config = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.targets),
                            layers_to_transform=list(range(layers - s.layers, layers)) if s.layers else None,
                            use_dora=s.method == "dora", task_type="CAUSAL_LM", bias="none")
        return get_peft_model(model, config)

    # -- the loop -----------------------------------------------------------------------------
    def _loss_sum(self, loss_module, batch: Batch):
        ids = torch.from_numpy(batch.input_ids).long().to(self.device)
        if batch.packed:  # transformers reads the packing off position ids restarting at 0
            kwargs = {"position_ids": torch.from_numpy(batch.position_ids).long().to(self.device)}
            if self.packed_attention:  # and attention, off the sequences' bounds
                kwargs.update(sequence_bounds(batch.segment_ids, self.device))
        else:
            kwargs = {"attention_mask": torch.from_numpy(batch.attention_mask).to(self.device)}
        flat = batch.labels.reshape(-1)
        where = np.flatnonzero(flat != IGNORE)
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext():
            return loss_module(ids, torch.from_numpy(where).to(self.device),
                               torch.from_numpy(flat[where].astype(np.int64)).to(self.device), **kwargs)

    def step(self, step: int, micro_batches: list[Batch], lr: float, step_tokens: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # DDP averages gradients over processes: scale up so the result is the global token mean
        scale = self.world_size / max(1, step_tokens)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = nullcontext() if last or not self.accelerator else self.accelerator.no_sync(self.wrapped)
            with sync:
                loss = self._loss_sum(self.wrapped, batch)
                (loss * scale).backward()
            total += loss.detach()
        if self.setup.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.setup.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._sum_over_processes(total)

    def grpo_step(self, step: int, prompts: PromptBatch, lr: float) -> dict[str, float]:
        return self.grpo.step(step, prompts, lr)

    def eval_loss(self, batches: list[Batch]) -> tuple[float, int]:
        self.model.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                total += float(self._loss_sum(self.loss, batch))
                tokens += batch.tokens
        self.model.train()
        return total, tokens

    def memory(self) -> dict[str, Any]:
        """What this process's device holds at most so far: on CUDA the allocator's peaks
        (allocated by tensors, reserved from the driver) and what NVML says the process uses."""
        if self.device.type != "cuda":
            return {"device": self.device.type}
        return {"device": "cuda", "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(self.device)),
                "nvml_used_bytes": _nvml_used(self.device.index or 0)}

    def _sum_over_processes(self, value) -> float:
        if self.accelerator:
            value = self.accelerator.reduce(value, reduction="sum")
        return float(value)

    # -- saving and resuming --------------------------------------------------------------------
    def export(self, out: Path) -> dict[str, Any]:
        """The adapter (PEFT), or for a full run a model folder: weights, config and tokenizer,
        which ``--model`` loads like any HF folder."""
        out = Path(out)
        self.model.save_pretrained(out)  # PEFT records the base folder as base_model_name_or_path
        if self.setup.method == "full":
            self.tokenizer.save_pretrained(out)
            return {"kind": "model", "format": "hf", "path": str(out), "method": "full",
                    "trainable_params": self.trainable_params}
        return {"kind": "adapter", "format": "peft", "path": str(out), "method": self.setup.method,
                "trainable_params": self.trainable_params}

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        if self.rank == 0:  # under DDP every process holds the same weights and optimizer state
            self.model.save_pretrained(folder)
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(_rng_state(), folder / f"rng-{self.rank}.pt")

    def load(self, folder: Path) -> None:
        src = Path(folder)
        if self.setup.method == "full":
            self._load_full(src)
        else:
            self._load_adapter(src)
        read_checkpoint_file(src / "optimizer.pt", self._load_optimizer)
        rng = src / f"rng-{self.rank}.pt"
        rng = rng if rng.exists() else src / "rng-0.pt"
        read_checkpoint_file(rng, lambda f: _set_rng_state(torch.load(f, weights_only=False)))

    def _load_optimizer(self, path: Path) -> None:
        self.optimizer.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    def _load_full(self, src: Path) -> None:
        """The weights ``save_pretrained`` wrote: model.safetensors, or its shards with their index."""
        from safetensors.torch import load_file

        index = src / "model.safetensors.index.json"
        if index.exists():
            import json

            shards = sorted(set(read_checkpoint_file(index, lambda f: json.loads(f.read_text())["weight_map"].values())))
            files = [src / name for name in shards]
        else:
            files = [src / "model.safetensors"]
        state = {}
        for f in files:
            state.update(read_checkpoint_file(f, load_file))
        expected = set(self.model.state_dict())
        tied = {k for k in expected if k not in state and _is_tied(self.model, k)}
        missing, unexpected = expected - set(state) - tied, set(state) - expected
        if missing or unexpected:
            name = sorted(missing or unexpected)[0]
            raise CorruptCheckpoint(files[0], f"not this model's weights: {'no' if missing else 'unexpected'} {name}")
        read_checkpoint_file(files[0], lambda _: self.model.load_state_dict(state, strict=False))

    def _load_adapter(self, src: Path) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        f = src / "adapter_model.safetensors"
        state = read_checkpoint_file(f, load_file)
        expected = set(get_peft_model_state_dict(self.model))
        if set(state) != expected:
            raise CorruptCheckpoint(f, "not this run's adapter: its tensors are not the ones this run's method, "
                                       "targets and layers train")
        read_checkpoint_file(f, lambda _: set_peft_model_state_dict(self.model, state))

    def sync(self, flag: bool) -> bool:
        if not self.accelerator:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), "sum").item())

    def barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        if self.accelerator:
            self.accelerator.end_training()
        if self.grpo is not None:
            self.grpo.close()
            self.grpo = None
        self.model = self.wrapped = self.loss = self.optimizer = self.params = None
        import gc

        gc.collect()


class LearnedTokenLoss(torch.nn.Module):
    """Summed cross-entropy over the learned tokens, with logits for those tokens only (see PLAIN_HEADS)."""

    def __init__(self, model, liger: bool = False):
        super().__init__()
        self.model = model
        self.head_loss = liger_linear_cross_entropy if liger else ChunkedLinearCrossEntropy.apply
        self.plain = getattr(self._base().config, "model_type", None) in PLAIN_HEADS

    def _base(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids, where, targets, **kwargs):
        if self.plain:
            base = self._base()
            hidden = base.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
            hidden = hidden.flatten(0, 1).index_select(0, where)
            head = base.get_output_embeddings()
            if type(head) is torch.nn.Linear and head.bias is None:  # not wrapped by an adapter
                return self.head_loss(hidden, head.weight, targets)
            logits = head(hidden)
        else:
            logits = self.model(input_ids=input_ids, use_cache=False, **kwargs).logits
            logits = logits.flatten(0, 1).index_select(0, where)
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(hidden @ weight.T, targets, reduction="sum")`` without the whole logits:
    the rows go through the head ``chunk_rows(vocab)`` at a time, and each chunk's gradients
    (softmax minus one-hot, times the head or the hidden states) are taken right there, so the
    backward pass only scales them. Memory: one chunk's fp32 logits instead of every learned
    token's (8192 tokens x 49k vocabulary x 12 bytes = 4.8 GB for SmolLM2 at batch 64 x 128),
    with no matmul recomputed. Under autocast the head's matmuls run in its dtype, the softmax in
    fp32. The head's gradient is taken only when it trains (a full run; tied embeddings get it
    through autograd)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        rows = chunk_rows(weight.shape[0])
        want_w = weight.requires_grad
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = torch.matmul(h, weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            grad = torch.softmax(logits, dim=-1)  # d loss / d logits = softmax - onehot
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_h[start:start + rows] = torch.matmul(grad.to(weight.dtype), weight).to(hidden.dtype)
            if want_w:
                grad_w += torch.matmul(grad.t(), h.float())
        ctx.save_for_backward(grad_h, grad_w if want_w else torch.empty(0))
        ctx.want_w, ctx.w_dtype = want_w, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.w_dtype) if ctx.want_w else None, None


def _nvml_used(index: int) -> int | None:
    """GPU memory this process uses on device ``index`` as the driver counts it (NVML, else
    nvidia-smi), or None where neither answers."""
    pid = os.getpid()
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    return int(proc.usedGpuMemory)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML, or no permission: try nvidia-smi
        pass
    out = run_tool(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]) or ""
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return int(parts[1]) * 1024**2
    return None


def _is_tied(model, key: str) -> bool:
    """Whether ``key`` is the output head tied to the input embeddings (``save_pretrained`` drops it)."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
