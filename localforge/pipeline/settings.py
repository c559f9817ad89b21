"""The pipeline file: each job's settings in the shape of that job's own ``--config``, one section
per stage, plus the few keys the stages share.

```yaml
documents: docs/               # files or folders, read beside this file
schema: schema.json            # the records' fields (or `fields: "name:str, ..."`)
teacher: {model: smollm2-135m} # extracts and writes the pairs (a role, as in `teach`)
model: smollm2-135m            # the student: fine-tuned, evaluated, exported
backend: auto                  # the student's engine (`--backend torch|mlx`)
output_dir: runs/pipeline
extract: {chunk_size: 256}     # `localforge extract --config` keys
generate: {pairs_per_record: 2}  # `teach generate --config` keys
dcr: null                      # `teach dcr --config` keys: improve every pair (off when null)
dataset: {min_quality: 0.5, sign: true, holdout: 0.25}
finetune: {method: lora, steps: 30}   # `localforge finetune` config keys (but data, output_dir)
eval: {max_tokens: 64}
export: {to: gguf, quant: q8_0}       # off when null
```

The shared keys fill what a section leaves unset: ``teacher`` is extract's backend and model and
the teacher of generate and dcr; ``model`` and ``backend`` are finetune's; ``schema``/``fields``
are extract's. Every section is validated as its job's own model (an error names
``extract.chunk_size`` and the file, override or flag), before any stage runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from localforge.extract.pipeline import ExtractSettings
from localforge.finetune.config import FinetuneConfig
from localforge.models import DEFAULT_MODEL
from localforge.settings import load_settings
from localforge.teach.generate import GenerateSettings
from localforge.teach.settings import Role, TeachSettings

STAGES = ("extract", "generate", "dcr", "dataset", "finetune", "eval", "export")
GENERAL = Path(__file__).with_name("general.jsonl")  # the built-in general sample (forgetting)
OWNED = {"finetune": ("data", "output_dir")}  # keys the pipeline sets itself


class DatasetSettings(BaseModel):
    """The dataset stage: ``teach dataset export`` over the pairs, then a split by pair."""

    model_config = ConfigDict(extra="forbid")

    min_quality: float | None = Field(None, ge=0, le=1, description="keep pairs the teacher scored at least this (null: keep all; unscored pairs are then kept)")
    sign: bool = Field(False, description="HMAC-sign every row with the key in $LOCALFORGE_SIGNING_KEY")
    format: Literal["messages", "prompt-completion"] = Field("messages", description="the training rows' shape")
    holdout: float = Field(0.25, ge=0, lt=1, description="share of pairs held out for eval (test.jsonl), other questions on records that stay in training where there are any")
    valid: float = Field(0.1, ge=0, lt=1, description="share of pairs for the validation loss (valid.jsonl)")
    seed: int = Field(0, ge=0, description="decides which pairs are held out")

    @model_validator(mode="after")
    def _shares(self) -> DatasetSettings:
        if self.holdout + self.valid >= 1:
            raise ValueError(f"holdout + valid must leave pairs to train on (got {self.holdout} + {self.valid})")
        return self


class EvalSettings(BaseModel):
    """The eval stage: the student without and with what fine-tuning made, on the held-out pairs
    and on a general sample."""

    model_config = ConfigDict(extra="forbid")
    PATHS: ClassVar[tuple[str, ...]] = ("general",)

    general: str | None = Field(str(GENERAL), description="a JSONL of {question, answer} (answer: a string or a list of accepted ones) asked to catch forgetting; null: none")
    general_limit: int | None = Field(None, ge=1, description="ask at most this many general questions")
    max_tokens: int = Field(64, ge=1, description="tokens per answer")
    judge: bool = Field(True, description="the teacher judges answers to held-out pairs that name no grounded value (free text)")

    @field_validator("general")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"{value} is not a file: give a JSONL of {{question, answer}} rows, or null")
        return value


class ExportSettings(BaseModel):
    """The export stage: ``localforge export`` of the fine-tuning run."""

    model_config = ConfigDict(extra="forbid")

    to: str = Field("gguf", description="hf, gguf or ollama")
    quant: str | None = Field(None, description="the GGUF type (gguf, ollama): f16, q8_0, ...; default f16")
    name: str | None = Field(None, description="the Ollama model name (ollama)")

    @model_validator(mode="after")
    def _known(self) -> ExportSettings:
        from localforge.backends import EXPORT_TARGETS, GGUF_TYPES

        if self.to not in EXPORT_TARGETS:
            raise ValueError(f"to: {self.to!r} is not an export target: use {', '.join(EXPORT_TARGETS)}")
        target = EXPORT_TARGETS[self.to]
        if self.quant is not None and (not target.gguf or self.quant not in GGUF_TYPES):
            raise ValueError(f"quant: {self.quant!r} " + (f"is not a GGUF type: use {', '.join(GGUF_TYPES)}" if target.gguf
                                                         else f"is for GGUF targets; to: {self.to} writes the base's dtype"))
        if self.name is not None and not target.modelfile:
            raise ValueError(f"name is the model name in a Modelfile; to: {self.to} writes none")
        return self

    def output(self, root: Path) -> Path:
        return root / "export" / ("model.gguf" if self.to == "gguf" else self.to)


def _role(value: Any) -> Any:
    """``teacher: REF`` is ``teacher: {model: REF}`` on ``auto`` (``ollama:qwen3:1.7b`` is Ollama's)."""
    return {"model": value} if isinstance(value, str) else value


class PipelineSettings(BaseModel):
    """Everything a ``localforge run`` decides, one section per stage in that job's own shape."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    PATHS: ClassVar[tuple[str, ...]] = ("documents", "schema", "examples")
    SECTIONS: ClassVar[tuple[str, ...]] = ("extract", "generate", "dcr", "eval")  # nested PATHS resolved too
    SHORTHANDS: ClassVar[dict[str, str]] = {"teacher": "model"}  # teacher: REF is teacher: {model: REF}

    documents: list[str] = Field(description="files or folders to extract from (read beside the pipeline file)")
    record_schema: dict | str | None = Field(None, alias="schema", description="the records' JSON Schema (file, module:Class, or inline); extract.schema overrides")
    fields: str | None = Field(None, description='inline fields instead of schema: "product:str, maker:str"')
    examples: list[dict] | str | None = Field(None, description="extract's few-shot examples")
    teacher: Role = Field(default_factory=Role, description="the model that extracts and writes the pairs: backend, model, base_url, ... (or a model reference; ollama:TAG goes to Ollama)")
    model: str = Field(DEFAULT_MODEL, description="the student: the model fine-tuned, evaluated and exported")
    backend: str = Field("auto", description="the student's engine for training and eval: auto, or one that trains (see `localforge doctor`)")
    output_dir: str = Field("runs/pipeline", description="the run folder: every stage's files, manifest.json")
    extract: ExtractSettings
    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    dcr: TeachSettings | None = Field(None, description="teach dcr over the pairs before the dataset (off when null)")
    dataset: DatasetSettings = Field(default_factory=DatasetSettings, description="the pairs to training rows and the held-out split")
    finetune: FinetuneConfig
    eval: EvalSettings = Field(default_factory=EvalSettings, description="the student without and with the fine-tune")
    export: ExportSettings | None = Field(default_factory=ExportSettings, description="localforge export of the run (off when null)")

    @field_validator("documents", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("documents")
    @classmethod
    def _there(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one file or folder")
        for p in value:
            if not Path(p).expanduser().exists():
                raise ValueError(f"{p}: no such file or folder")
        return [str(Path(p).expanduser().resolve()) for p in value]

    @model_validator(mode="before")
    @classmethod
    def _shared(cls, data: Any) -> Any:
        """The shared keys fill each section's unset ones; the keys the pipeline owns are refused."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "teacher" in data:
            data["teacher"] = _role(data["teacher"])
        teacher = data.get("teacher") if isinstance(data.get("teacher"), dict) else {}
        role = {k: v for k, v in teacher.items() if k in ("backend", "model", "base_url", "api_key_env", "timeout", "concurrency")}
        sections = {s: data.get(s) for s in ("extract", "generate", "dcr", "finetune")}
        for name in ("extract", "generate", "finetune"):
            if sections[name] is None:
                data[name] = sections[name] = {}
        for name, section in sections.items():
            if not isinstance(section, dict):
                continue
            section = data[name] = dict(section)
            for key in OWNED.get(name, ()):
                if key in section:
                    raise ValueError(f"{name}.{key} is set by the pipeline (the dataset stage's files, the run folder): "
                                     f"remove it")
            if name == "extract":
                for k, v in role.items():
                    section.setdefault(k, v)
                if "schema" not in section and "fields" not in section:
                    for k in ("schema", "fields", "examples"):
                        if data.get(k) is not None:
                            section.setdefault(k, data[k])
            elif name in ("generate", "dcr"):
                section["teacher"] = {**role, **_role(section.get("teacher") or {})}
                if name == "dcr":
                    section.setdefault("student", {"backend": "auto", "model": data.get("model", DEFAULT_MODEL)})
            elif name == "finetune":
                section.setdefault("model", data.get("model", DEFAULT_MODEL))
                section.setdefault("backend", data.get("backend", "auto"))
                section["data"] = "dataset"  # placeholders: the run sets both
                section["output_dir"] = "finetune"
        return data

    @field_validator("backend")
    @classmethod
    def _trains(cls, value: str) -> str:
        from localforge.backends import trainers

        if value not in ("auto", *trainers()):
            raise ValueError(f"expected auto or an engine that trains ({', '.join(trainers())}), got {value!r}")
        return value

    @model_validator(mode="after")
    def _signing_key(self) -> PipelineSettings:
        if self.dataset.sign:
            from localforge.teach import signing

            signing.key_from_env(signing.KEY_ENV, what="dataset.sign")
        return self

    @property
    def root(self) -> Path:
        return Path(self.output_dir).expanduser().absolute()

    def section(self, stage: str) -> dict:
        """A stage's settings as plain JSON (what decides it, with the run's own paths left out)."""
        value = getattr(self, stage)
        if value is None:
            return {}
        out = value.model_dump(mode="json", by_alias=True, exclude={"pdf_password"} if stage == "extract" else None)
        if stage == "finetune":
            out.pop("data"), out.pop("output_dir")
        return out

    def digest(self, stage: str) -> str:
        return hashlib.sha256(json.dumps(self.section(stage), sort_keys=True).encode()).hexdigest()[:16]


def load_pipeline(path: str | Path, overrides: list[str] = (), flags: dict | None = None) -> PipelineSettings:
    """The pipeline file with ``key=value`` overrides (``finetune.steps=40``) and flags applied;
    relative paths in it (documents, schemas, the general sample) are read beside the file."""
    return load_settings(PipelineSettings, path, overrides, flags)
