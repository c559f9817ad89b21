"""The MLX training engine: mlx-lm's model classes and LoRA/DoRA layers, AdamW, a summed token loss.

The base model is loaded from a HF folder and frozen; mlx-lm's ``linear_to_lora_layers`` swaps
the target linears of the last ``layers`` blocks for LoRA (or DoRA) layers, with
``scale = alpha / rank``. ``full`` trains every weight (of the last ``layers`` blocks when set).

A packed row holds several sequences. mlx-lm models build their attention mask with the
``create_attention_mask`` of their own module, so while a packed batch runs that function is
swapped for one that returns a block-diagonal causal mask built from ``segment_ids``. Rotary
positions are relative, so attention scores need no position restart; models with learned
absolute positions or state-space layers cannot pack here.

Dropout draws from ``mx.random`` (process-wide), reseeded from (seed, step) at the start of every
step, so a resumed run draws the same masks from the step number the driver hands over.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from localforge.backends.training import (
    IGNORE,
    PLAIN_HEADS,
    Batch,
    PromptBatch,
    TrainSetup,
    read_checkpoint_file,
)
from localforge.errors import ConfigError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
METHODS = ("lora", "dora", "full")
ABSOLUTE_POSITIONS = {"wpe", "embed_positions", "position_embeddings"}  # learned positions: packing would shift them


def _block_keys(blocks, targets: list[str]) -> list[str]:
    """In-block module paths (``self_attn.q_proj``) for short target names (``q_proj``) or full paths."""
    import mlx.nn as nn

    linears = {k for b in blocks for k, m in b.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}
    keys = []
    for t in targets:
        found = sorted(k for k in linears if k == t or k.endswith("." + t))
        if not found:
            raise ConfigError(f"lora target '{t}' is not a linear layer of this model: choose from "
                              f"{', '.join(sorted({k.rsplit('.', 1)[-1] for k in linears}))}")
        keys += [k for k in found if k not in keys]
    return keys


class MLXTrainer:
    rank = 0
    world_size = 1

    def __init__(self, setup: TrainSetup):
        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx_lm.tuner.utils import linear_to_lora_layers
        from mlx_lm.utils import get_total_parameters, load_model

        from localforge.backends.hf import load_tokenizer
        from localforge.backends.mlx.load import model_config

        if setup.method not in METHODS or setup.dtype not in DTYPES:
            raise ConfigError(f"mlx trains method {', '.join(METHODS)} in dtype {', '.join(DTYPES)}: "
                              f"got method '{setup.method}', dtype '{setup.dtype}'")
        self.mx, self.nn, self.setup = mx, nn, setup
        model, _ = load_model(Path(setup.model_path), model_config=model_config(setup.model_path))
        self.tokenizer = load_tokenizer(setup.model_path)  # what mlx-lm's loader wraps
        model.set_dtype(getattr(mx, DTYPES[setup.dtype]))
        blocks = len(model.layers)
        self.num_layers = blocks if setup.layers is None else max(1, min(setup.layers, blocks))
        self.lora_parameters: dict[str, Any] = {}
        mx.random.seed(setup.seed)  # LoRA's initial A matrices
        if setup.method == "full":
            if self.num_layers < blocks:
                model.freeze()
                for block in model.layers[-self.num_layers:]:
                    block.unfreeze()
        else:
            model.freeze()
            keys = _block_keys(model.layers[-self.num_layers:], setup.targets)
            self.lora_parameters = {"rank": setup.rank, "scale": setup.alpha / setup.rank,
                                    "dropout": setup.dropout, "keys": keys}
            linear_to_lora_layers(model, self.num_layers, self.lora_parameters, use_dora=setup.method == "dora")
        model.train()
        mx.eval(model.parameters())
        self.model = model
        self.trainable_params = sum(v.size for _, v in self._trainable())
        # mlx-lm counts the weights of leaf modules (unpacking quantized ones); LoRA's own sit on the wrappers
        self.total_params = int(get_total_parameters(model)) + (self.trainable_params if self.lora_parameters else 0)
        self.optimizer = optim.AdamW(learning_rate=0.0, weight_decay=setup.weight_decay)
        self._grad = nn.value_and_grad(model, self._loss)
        self.grpo = None
        if setup.grpo is not None:
            from localforge.backends.mlx.grpo import MLXGrpo

            self.grpo = MLXGrpo(self, setup.grpo)

    def _trainable(self) -> list[tuple[str, Any]]:
        from mlx.utils import tree_flatten

        return tree_flatten(self.model.trainable_parameters())

    @contextmanager
    def _attention(self, batch: Batch):
        """While a packed batch runs, the model's module builds block-diagonal causal masks."""
        if not batch.packed:
            yield
            return
        mx = self.mx
        modules = {sys.modules[type(m).__module__] for _, m in self.model.named_modules()}
        modules = [m for m in modules if hasattr(m, "create_attention_mask")]
        names = {k.rsplit(".", 1)[-1] for k, _ in self.model.named_modules()}
        if not modules or any(hasattr(m, "create_ssm_mask") for m in modules) or names & ABSOLUTE_POSITIONS:
            raise ConfigError(f"packing on mlx needs a rotary-position model that builds its mask with "
                              f"create_attention_mask ({type(self.model).__module__} does not): set packing: false")
        seg = mx.array(batch.segment_ids)
        i = mx.arange(seg.shape[1])[:, None]
        j = mx.arange(seg.shape[1])[None]
        block = (seg[:, None, :, None] == seg[:, None, None, :]) & (i >= j)  # [B, 1, T, T]

        def packed_mask(h, cache=None, window_size=None, return_array=False):
            return block & (i < j + window_size) if window_size else block

        originals = [(m, m.create_attention_mask) for m in modules]
        for m, _ in originals:
            m.create_attention_mask = packed_mask
        try:
            yield
        finally:
            for m, original in originals:
                m.create_attention_mask = original

    @contextmanager
    def _checkpointed(self):
        """Gradient checkpointing while a step traces its graph: mlx-lm patches the block class."""
        from mlx_lm.tuner.trainer import grad_checkpoint

        if not self.setup.gradient_checkpointing:
            yield
            return
        cls = type(self.model.layers[0])
        original = cls.__call__
        grad_checkpoint(self.model.layers[0])
        try:
            yield
        finally:
            cls.__call__ = original  # other models of this class (generation) stay as they were

    def _head(self):
        """The output head, when logits are exactly head(decoder output) (see PLAIN_HEADS)."""
        model = self.model
        if getattr(model, "model_type", None) not in PLAIN_HEADS or not hasattr(model, "model"):
            return None
        if hasattr(model, "lm_head"):
            return model.lm_head
        return model.model.embed_tokens.as_linear

    def _summed_loss(self, batch: Batch):
        """Summed cross-entropy over the learned tokens; logits are computed for those tokens only."""
        mx = self.mx
        flat = batch.labels.reshape(-1)
        where = np.flatnonzero(flat != IGNORE)
        index, targets = mx.array(where.astype(np.int32)), mx.array(flat[where])
        head = self._head()
        with self._attention(batch):
            if head is not None:
                hidden = self.model.model(mx.array(batch.input_ids))
                logits = head(hidden.reshape(-1, hidden.shape[-1])[index])
            else:
                logits = self.model(mx.array(batch.input_ids))
                logits = logits.reshape(-1, logits.shape[-1])[index]
        return self.nn.losses.cross_entropy(logits.astype(mx.float32), targets).sum()

    def _loss(self, batch: Batch, step_tokens: int):
        total = self._summed_loss(batch)
        return total / step_tokens, total

    def step(self, step: int, micro_batches: list[Batch], lr: float, step_tokens: int) -> float:
        mx = self.mx
        from mlx.optimizers import clip_grad_norm
        from mlx.utils import tree_map

        mx.random.seed(self.setup.seed * 1_000_003 + step)  # dropout masks: a function of (seed, step)
        loss, grads = 0.0, None
        for batch in micro_batches:
            with self._checkpointed():
                (_, total), g = self._grad(batch, max(step_tokens, 1))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(total, grads)
            loss += total.item()
        if self.setup.max_grad_norm:
            grads, _ = clip_grad_norm(grads, self.setup.max_grad_norm)
        self.optimizer.learning_rate = lr
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)
        return loss

    def grpo_step(self, step: int, prompts: PromptBatch, lr: float) -> dict[str, float]:
        return self.grpo.step(step, prompts, lr)

    def eval_loss(self, batches: list[Batch]) -> tuple[float, int]:
        self.model.eval()
        try:
            loss = 0.0
            for batch in batches:
                loss += self._summed_loss(batch).item()
            return loss, sum(b.tokens for b in batches)
        finally:
            self.model.train()

    def memory(self) -> dict[str, Any]:
        """MLX's own count of the memory its arrays held at most (on Metal: the GPU's, which shares
        the machine's memory), and what its buffer cache holds now."""
        import mlx.core as mx

        device = "metal" if mx.default_device() == mx.gpu else "cpu"
        return {"device": device, "peak_allocated_bytes": int(mx.get_peak_memory()),
                "cache_bytes": int(mx.get_cache_memory())}

    def export(self, out: Path) -> dict[str, Any]:
        """The adapter in mlx-lm's format; for a full run a model folder (weights, config,
        tokenizer) that ``--model`` loads on any engine."""
        out = Path(out)
        if self.setup.method == "full":
            return self._export_model(out)
        self._write_adapter(out)
        return {"kind": "adapter", "format": "mlx", "path": str(out), "method": self.setup.method,
                "trainable_params": self.trainable_params}

    def _export_model(self, out: Path) -> dict[str, Any]:
        import shutil

        from mlx_lm.utils import save_model

        save_model(out, self.model)
        src = Path(self.setup.model_path)
        for name in ("config.json", "generation_config.json"):
            if (src / name).is_file():
                shutil.copy(src / name, out / name)
        self.tokenizer.save_pretrained(out)
        return {"kind": "model", "format": "hf", "path": str(out), "method": "full",
                "trainable_params": self.trainable_params}

    def _write_adapter(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        s = self.setup
        self.mx.save_safetensors(str(out / "adapters.safetensors"), dict(self._trainable()))
        config = {"fine_tune_type": s.method, "num_layers": self.num_layers, "format": "mlx",
                  "base_model": str(s.model_path), "dtype": s.dtype}
        if s.method != "full":
            config |= {"lora_parameters": self.lora_parameters, "rank": s.rank, "alpha": s.alpha,
                       "targets": list(s.targets)}
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def save(self, folder: Path) -> None:
        from mlx.utils import tree_flatten

        self._write_adapter(Path(folder))  # the trained weights (all of them for a full run)
        self.optimizer.init(self.model.trainable_parameters())  # no-op once the first step has run
        self.mx.save_safetensors(str(Path(folder) / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))

    def load(self, src: Path) -> None:
        from mlx.utils import tree_map_with_path

        mx, src = self.mx, Path(src)
        weights = read_checkpoint_file(src / "adapters.safetensors", lambda f: mx.load(str(f)))
        expected = {k for k, _ in self._trainable()}
        if set(weights) != expected:
            raise ConfigError(f"{src}: the saved adapter does not match this run's method, targets or layers: "
                              f"resume with the settings it was trained with")
        read_checkpoint_file(src / "adapters.safetensors",
                             lambda _: self.model.load_weights(list(weights.items()), strict=False))
        saved = read_checkpoint_file(src / "optimizer.safetensors", lambda f: mx.load(str(f)))
        self.optimizer.init(self.model.trainable_parameters())
        read_checkpoint_file(src / "optimizer.safetensors", lambda _: setattr(
            self.optimizer, "state", tree_map_with_path(lambda path, _: saved[path], self.optimizer.state)))
        mx.eval(self.model.parameters(), self.optimizer.state)

    def sync(self, flag: bool) -> bool:
        return flag  # one process

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        if self.grpo is not None:
            self.grpo.close()
        self.model = self.optimizer = self._grad = self.grpo = None
        self.mx.clear_cache()
