"""The fine-tuning config: one YAML file for every engine that trains, validated, with key=value
overrides (read by ``localforge.settings``).

Errors name the key, what it got and what it accepts, in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from localforge.models import DEFAULT_MODEL
from localforge.settings import load_settings

Auto = Literal["auto"]


def _no_bool(value):
    # YAML reads yes/no/true/false as booleans, which pydantic would take as 1 and 0
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


# every number has its range here, so a bad value is refused (naming its key) before any work
Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
Count = Annotated[Int, Field(ge=1)]  # a whole number, 1 or more
def _plain_text(value: str) -> str:
    """A name or a path: no control characters (a tab, \\x1f or NUL in a path is a slip, not a name)."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"expected plain text without control characters, got {value!r:.40}")
    return value


Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1), AfterValidator(_plain_text)]
SEED_MAX = 2**32 - 1  # numpy's seeds are unsigned 32-bit


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: Annotated[Int, Field(ge=1, le=4096)] | Auto = Field(8, description="LoRA rank, or auto (chosen by the planner)")
    alpha: Float = Field(16.0, gt=0, allow_inf_nan=False, description="LoRA scale numerator (0 would train nothing)")
    dropout: Float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    targets: list[Name] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                                description="the model's linear layers to adapt (checked against the model)")
    layers: Count | Auto | None = Field(None, description="adapt only the last N layers (None: all; at most the model's)")


class RewardSpec(BaseModel):
    """One reward of a GRPO run: a name from the rewards library, its weight and its options."""
    model_config = ConfigDict(extra="forbid")

    name: Name
    weight: Float = Field(1.0, allow_inf_nan=False)
    options: dict = Field(default_factory=dict, description="the reward's own keys (see `finetune.rewards`)")


def _reward_spec(value):
    # `rewards: [exact_match, {name: length, target: 200, weight: 0.5}]`: a bare name, or a mapping
    # whose keys other than name and weight are the reward's options
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and "options" not in value:
        known = {"name", "weight"}
        return {**{k: v for k, v in value.items() if k in known},
                "options": {k: v for k, v in value.items() if k not in known}}
    return value


class GrpoConfig(BaseModel):
    """GRPO (group relative policy optimisation): per prompt, sample ``num_generations``
    completions, score them with the rewards, and push the policy towards the better ones of each
    group, with a KL penalty ``beta`` towards the starting model."""
    model_config = ConfigDict(extra="forbid")

    rewards: list[Annotated[RewardSpec, BeforeValidator(_reward_spec)]] = Field(
        default_factory=lambda: [RewardSpec(name="exact_match")], min_length=1,
        description="rewards by name (exact_match, format, length, json_valid, json_fields, teaching) or {name, weight, its options}")
    train: Literal["lora", "dora", "full"] = Field("lora", description="the weights GRPO updates")
    num_generations: Annotated[Int, Field(ge=2, le=64)] | Auto = Field("auto", description="completions sampled per prompt (a group); auto: 8 on an accelerator, 4 on a CPU")
    max_completion_length: Annotated[Int, Field(ge=1, le=32768)] | Auto = Field("auto", description="tokens per sampled completion, at most; auto: 512 on CUDA, 256 on Metal, 128 on a CPU")
    max_prompt_length: Annotated[Int, Field(ge=8)] = Field(256, description="a prompt longer than this (in tokens, chat template included) is refused before training")
    beta: Float = Field(0.04, ge=0.0, allow_inf_nan=False, description="KL penalty towards the starting model")
    epsilon: Float = Field(0.2, gt=0.0, lt=1.0, allow_inf_nan=False, description="clipping of the policy ratio")
    temperature: Float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False, description="sampling temperature of the completions")
    top_p: Float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling of the completions")
    scale_rewards: bool = Field(True, description="divide each group's advantages by its reward spread")
    student: dict = Field(default_factory=dict, description="the teaching reward's student: backend, model, ...")


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    PATHS: ClassVar[tuple[str, ...]] = ("data",)  # read beside the config file when it is there

    model: Name = Field(DEFAULT_MODEL, description="the model to train: an alias, a HF folder, a .gguf (converted), a cached repo id")
    data: Name = Field(description="a JSONL file, or a folder with train.jsonl (and valid.jsonl): messages, prompt/completion or text rows")
    method: Literal["lora", "dora", "full", "grpo"] = Field("lora", description="what to train: LoRA or DoRA adapters, every weight, or GRPO")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the adapter (lora, dora; grpo with train: lora|dora)")
    grpo: GrpoConfig | None = Field(None, description="method grpo's keys (rewards, generations, beta, ...)")
    backend: str = Field("auto", description="auto, or an engine that trains (see `localforge doctor`)")
    steps: Int | None = Field(None, ge=1, description="optimizer steps (default 100 when epochs is unset)")
    epochs: Float | None = Field(None, gt=0, allow_inf_nan=False, description="passes over the training rows instead of steps")
    batch_size: Count | Auto = Field("auto", description="rows per micro-batch per process; auto: the planner's, from memory")
    grad_accum: Count | Auto = Field("auto", description="micro-batches per optimizer step; auto: effective_batch over batch_size and processes")
    effective_batch: Count = Field(16, description="rows (packs, when packing) per optimizer step over every process and micro-batch, the same on every machine; the planner fits batch_size and grad_accum to it")
    learning_rate: Float = Field(2e-4, gt=0, allow_inf_nan=False, description="the peak learning rate (AdamW)")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="the decay after warmup")
    warmup_steps: Int = Field(0, ge=0, description="steps of linear warmup from 0")
    max_seq_length: Int = Field(512, ge=16, description="at most the model's context (checked against the model)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="training precision; auto: bf16 where the device has it, else fp32")
    gradient_checkpointing: bool | Auto = Field("auto", description="recompute activations to save memory; auto: when the plan needs it")
    mask_prompt: bool = Field(True, description="train on the completions only (the prompt's tokens get no loss)")
    packing: bool | Auto = Field("auto", description="pack several short rows into one sequence of max_seq_length, kept apart exactly; auto: where the engine keeps them apart for every model (torch)")
    kernels: Literal["auto", "native", "liger"] = Field("auto", description="the training kernels: native (the engine's own), or liger (Liger's Triton RMSNorm, RoPE, SwiGLU and fused linear cross-entropy: torch on CUDA, Llama-like models, pip install 'localforge[cuda]'); auto: native")
    compile: bool | Auto = Field("auto", description="compile each decoder layer with torch.compile (fuses the small operations between the matmuls, after a compile at the first steps of a start or resume; torch on CUDA or a CPU with a C++ compiler); auto: off")
    seed: Int = Field(0, ge=0, le=SEED_MAX, description="seeds the data order, the adapter's init and dropout")
    eval_every: Int = Field(50, ge=1, description="steps between validation losses (with valid rows)")
    eval_batches: Int | None = Field(None, ge=1, description="cap on validation batches per evaluation")
    save_every: Int = Field(50, ge=1, description="steps between checkpoints (a resume starts from the newest)")
    keep_checkpoints: Int = Field(2, ge=1, description="newest checkpoints kept; older ones are deleted")
    weight_decay: Float = Field(0.0, ge=0.0, allow_inf_nan=False, description="AdamW weight decay")
    max_grad_norm: Float | None = Field(1.0, gt=0, allow_inf_nan=False, description="gradient clipping (null: none)")
    num_processes: Count | Auto = Field("auto", description="training processes (accelerate launch); auto: one per GPU")
    output_dir: Name = Field("runs/run", description="the run folder: adapter, checkpoints, metrics, manifest, loss.png")

    @field_validator("backend")
    @classmethod
    def _an_engine_that_trains(cls, value: str) -> str:
        from localforge.backends import trainers

        names = ["auto", *trainers()]
        if value not in names:
            raise ValueError(f"expected {', '.join(repr(n) for n in names[:-1])} or {names[-1]!r} "
                             f"(backends that train), got {value!r}")
        return value

    @property
    def weights(self) -> str:
        """What the run updates: lora, dora or full (for grpo, its ``train`` key)."""
        return self.grpo.train if self.method == "grpo" else self.method

    @model_validator(mode="after")
    def _grpo_keys(self) -> FinetuneConfig:
        if self.method == "grpo" and self.grpo is None:
            self.grpo = GrpoConfig()
        if self.method != "grpo" and self.grpo is not None:
            raise ValueError(f"a grpo section is for method: grpo (method is {self.method!r}): "
                             "set method: grpo, or remove the grpo section")
        return self

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> FinetuneConfig:
        if self.steps is None and self.epochs is None:
            self.steps = 100
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self


def load_config(path: str | Path | None, overrides: list[str] = (), flags: dict | None = None) -> FinetuneConfig:
    """The config at ``path`` with ``key=value`` overrides and flags applied (see ``settings``)."""
    return load_settings(FinetuneConfig, path, overrides, flags)
