"""What a training engine offers the engine-neutral fine-tuning driver (``localforge.finetune``).

An engine (``backends/torch/train.py``, ``backends/mlx/train.py``, or any spec's ``trainer``)
builds the model with its adapter from a ``TrainSetup``, hands over the model's tokenizer, and
does one optimizer step on the micro-batches it is handed. Everything else (data order,
learning-rate schedule, when to evaluate and save, progress, resume bookkeeping, reports) lives
in ``finetune/`` and is the same for every engine.

A checkpoint folder is shared by contract: the driver writes its own files there
(``trainer_state.json``) and gives the engine a subfolder of its own (``engine/``) for
everything it needs to continue (weights, optimizer, RNG), so neither can overwrite the other.

Batches are plain numpy arrays, already shifted: ``labels[b, t]`` is the token the model should
predict after reading ``input_ids[b, : t + 1]``, or -100 where nothing is learned (the prompt,
padding, and the last token of each packed segment). ``segment_ids`` numbers the packed
sequences of a row (1, 2, ...; 0 for padding); attention must not cross them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from localforge.errors import ConfigError

IGNORE = -100

# Architectures whose logits are exactly the output head applied to the decoder's last hidden
# state (no soft-capping or scaling after it). For these the engines compute logits for the
# learned tokens only: the vocabulary projection is the largest matmul of a small model (49k x
# 576 for SmolLM2) and its fp32 logits the largest activation, and prompts and padding need neither.
PLAIN_HEADS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"})
# an engine whose spec says ``chunked_loss`` takes those logits this many at a time (a chunk of
# rows of the head), with the loss's gradients, so no step holds more of them
CHUNK_LOGITS = 1 << 24


def chunk_rows(vocab: int) -> int:
    """Learned tokens per chunk of a chunked loss: about ``CHUNK_LOGITS`` logits (64 MB in fp32)."""
    return max(64, CHUNK_LOGITS // vocab)



class CorruptCheckpoint(ConfigError):
    """A checkpoint file that cannot be read back (random bytes, empty, truncated, not what was
    saved): one line, "corrupt or unreadable: PATH (why)", raised by ``Trainer.load``."""

    def __init__(self, path: str | Path, why: str = "", hint: str = ""):
        self.path, self.why = Path(path), why
        super().__init__(f"corrupt or unreadable: {path}" + (f" ({why})" if why else "") + (f"; {hint}" if hint else ""))


def read_checkpoint_file(path: Path, reader):
    """``reader(path)``, with any failure to read or make sense of it as ``CorruptCheckpoint``."""
    try:
        return reader(path)
    except FileNotFoundError:
        raise CorruptCheckpoint(path, "missing") from None
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise CorruptCheckpoint(path, f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__) from None


@dataclass
class Batch:
    input_ids: np.ndarray  # [B, T] int32, right-padded with the pad id
    labels: np.ndarray  # [B, T] int32, shifted; IGNORE where nothing is learned
    segment_ids: np.ndarray  # [B, T] int32: 1, 2, ... per packed sequence, 0 for padding
    position_ids: np.ndarray  # [B, T] int32: restart at 0 in every segment

    @property
    def tokens(self) -> int:
        """Tokens the loss is taken over."""
        return int((self.labels != IGNORE).sum())

    @property
    def packed(self) -> bool:
        return bool(self.segment_ids.max(initial=0) > 1)

    @property
    def attention_mask(self) -> np.ndarray:
        return (self.segment_ids > 0).astype(np.int32)


@dataclass
class GrpoSetup:
    """What a GRPO step needs besides the model: the sampling, the objective and the rewards.

    ``score(prompts, completions, fields)`` returns each reward's values (a list per reward, one
    value per completion); ``fields`` maps each data column to its values, aligned with the
    completions. It raises a ``LocalforgeError`` naming the reward that failed; engines let it
    through untouched.
    """

    num_generations: int = 4
    max_completion_length: int = 128
    beta: float = 0.04
    epsilon: float = 0.2
    temperature: float = 1.0
    top_p: float = 1.0
    scale_rewards: bool = True
    batch_size: int = 1  # prompts per micro-batch (each with num_generations completions)
    grad_accum: int = 1  # micro-batches per optimizer step; one generation batch per step
    reward_names: list[str] = field(default_factory=list)
    reward_weights: list[float] = field(default_factory=list)
    score: Callable[[list[str], list[str], dict[str, list]], list[list[float]]] | None = None


@dataclass
class PromptBatch:
    """One GRPO step's prompts (this process's share): conversations and their rows' fields."""

    conversations: list[list[dict]]
    fields: list[dict]

    @property
    def texts(self) -> list[str]:
        """The last user turn of each conversation: the prompt a reward sees."""
        return [next((m["content"] for m in reversed(c) if m["role"] == "user"), c[-1]["content"])
                for c in self.conversations]


@dataclass
class TrainSetup:
    model_path: str  # a HF folder
    method: str = "lora"  # lora, dora, full
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: int | None = None  # adapt the last N layers; None: all
    dtype: str = "fp32"  # fp32, bf16, fp16
    gradient_checkpointing: bool = False
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    threads: int | None = None
    kernels: str = "native"  # or a kernel set of the engine's spec (``kernels``): liger
    compile: bool = False  # each decoder layer through torch.compile
    grpo: GrpoSetup | None = None  # set for method grpo (``method`` then names the weights it updates)


def group_fields(fields: list[dict], repeat: int) -> dict[str, list]:
    """Rows' fields as columns, each row repeated ``repeat`` times (once per completion of its group)."""
    keys = list(dict.fromkeys(k for f in fields for k in f))
    return {k: [f.get(k) for f in fields for _ in range(repeat)] for k in keys}


class Trainer(Protocol):
    """One engine's model, adapter, optimizer and tokenizer, in one training process."""

    rank: int  # this process, 0 when training alone
    world_size: int
    trainable_params: int
    total_params: int
    tokenizer: Any  # the model's tokenizer: apply_chat_template, encode, eos_token_id, pad_token_id
    # optional: ``memory() -> dict``, the device memory the process held at most ("device", and on
    # a GPU "peak_allocated_bytes", "peak_reserved_bytes", "nvml_used_bytes"); the manifest keeps it

    def step(self, step: int, micro_batches: list[Batch], lr: float, step_tokens: int) -> float:
        """Optimizer step number ``step`` (0-based) over ``micro_batches``, this process's share.

        The loss is normalised by ``step_tokens``, the loss tokens of the whole step across all
        processes, so accumulation and process count do not change the gradient. Anything random
        in the step (dropout) is a function of (seed, ``step``) or of state that ``save`` keeps.
        Returns the summed loss of the step over all processes (divide by ``step_tokens``).
        """

    def grpo_step(self, step: int, prompts: PromptBatch, lr: float) -> dict[str, float]:
        """Method grpo's optimizer step ``step`` (0-based) over ``prompts``, this process's share:
        sample ``num_generations`` completions per prompt, score them with ``setup.grpo.score``,
        take group-relative advantages and update the policy (clipped ratio, KL ``beta`` towards
        the starting model). Sampling draws from state that ``save`` keeps, so a resumed run
        samples what an uninterrupted one would. Returns the step's metrics: ``loss``,
        ``reward`` (mean of the weighted sum) and ``reward_std``, ``reward/<name>`` per reward,
        ``kl``, ``completion_length`` (mean tokens), ``tokens`` (prompt and completion tokens).
        Engines that do not train grpo need not have it."""

    def eval_loss(self, batches: list[Batch]) -> tuple[float, int]:
        """Summed loss and loss-token count over ``batches``, with no gradient."""

    def save(self, folder: Path) -> None:
        """Write everything resuming needs into ``folder`` (the engine's own; it exists): the
        trained weights, optimizer and RNG state. Called on every process; under several
        processes each writes what is its own."""

    def load(self, folder: Path) -> None:
        """Continue from what ``save`` wrote in ``folder``; a file that cannot be read back (or
        does not hold what this run saves) raises ``CorruptCheckpoint`` naming it."""

    def export(self, out: Path) -> dict[str, Any]:
        """Write the adapter in the engine's native format, loadable by ``generate --adapter``, or
        for ``method: full`` a model folder (weights, config, tokenizer) loadable by ``--model``;
        return its description (kind: adapter or model, format, path). Called on rank 0."""

    def sync(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any (one Ctrl-C stops them all)."""

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def close(self) -> None:
        """Release distributed groups and memory."""
