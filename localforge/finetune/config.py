"""The fine-tuning config: one YAML file for MLX and torch, validated, with key=value overrides.

Errors name the key, what it got and what it accepts, in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from localforge.errors import ConfigError

Auto = Literal["auto"]


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int | Auto = Field(8, description="LoRA rank, or auto (chosen by the planner)")
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: int | Auto | None = Field(None, description="adapt only the last N layers (None: all)")


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "smollm2-135m"
    data: str
    method: Literal["lora", "dora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    backend: Literal["auto", "mlx", "torch"] = "auto"
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: int | Auto = "auto"
    grad_accum: int | Auto = "auto"
    learning_rate: float = Field(2e-4, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_seq_length: int = Field(512, ge=16)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool | Auto = "auto"
    mask_prompt: bool = True  # train on completions only
    packing: bool = False
    seed: int = 0
    eval_every: int = Field(50, ge=1)
    eval_batches: int | None = Field(None, ge=1, description="cap on validation batches per evaluation")
    save_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept; older ones are deleted")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    num_processes: int | Auto = Field("auto", description="training processes (accelerate launch); auto: one per GPU")
    output_dir: str = "runs/run"

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> FinetuneConfig:
        if self.steps is None and self.epochs is None:
            self.steps = 100
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self


_KINDS = {"int_parsing": "a whole number", "int_type": "a whole number", "float_parsing": "a number",
          "float_type": "a number", "bool_parsing": "true or false", "bool_type": "true or false",
          "string_type": "a string", "list_type": "a list"}


def _key(err: dict) -> str:
    # pydantic adds the union member tried (int, literal['auto'], ...) to the location: drop it
    return ".".join(str(p) for p in err["loc"] if not str(p).startswith(("int", "literal[", "bool", "float")))


def _describe(errors: list[dict]) -> str:
    """One line for the first offending key, its union alternatives merged."""
    first = errors[0]
    key = _key(first)
    same = [e for e in errors if _key(e) == key]
    got = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"config key '{key}' is not known; check its spelling (see `localforge finetune --help`)"
    if not key:
        return f"config: {first['msg'].removeprefix('Value error, ')}"
    if first["type"] == "missing":
        return f"config key '{key}' is required"
    if len(same) > 1 or first["type"] in _KINDS or first["type"] == "literal_error":
        wanted = []
        for e in same:
            if e["type"] == "literal_error":
                wanted.append(e["ctx"]["expected"])
            else:
                wanted.append(_KINDS.get(e["type"], e["msg"]))
        return f"config key '{key}': expected {' or '.join(dict.fromkeys(wanted))}, got {got!r}"
    return f"config key '{key}': {first['msg'][0].lower() + first['msg'][1:]}, got {got!r}"


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, item: str) -> None:
    """``lora.rank=16`` sets data["lora"]["rank"] = 16 (values parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}': write key=value, e.g. steps=200 or lora.rank=16")
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
    node[parts[-1]] = _parse_value(value)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> FinetuneConfig:
    import yaml

    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such config file") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    try:
        return FinetuneConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        keys = list(dict.fromkeys(_key(e) for e in errors))
        more = f" (and {len(keys) - 1} more key{'s' if len(keys) > 2 else ''})" if len(keys) > 1 else ""
        prefix = f"{path}: " if path else ""
        raise ConfigError(prefix + _describe(errors) + more) from None
