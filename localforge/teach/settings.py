"""The teach job's settings: one pydantic model, read by ``settings.load_settings`` (a YAML file,
``key=value`` overrides, flags), with a section for each model:

```yaml
teacher: {backend: openai, model: qwen2.5-7b-instruct, base_url: http://127.0.0.1:1234/v1}
student: {backend: auto, model: smollm2-135m}
max_iterations: 3
threshold: 0.8
```
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from localforge.backends import known_backend, server_url
from localforge.settings import BackendChoice, load_settings

PROMPT_VERSION = "dcr-v1"


class Role(BackendChoice):
    """The model that plays one part (teacher or student), and how to reach it."""

    model_config = ConfigDict(extra="forbid")

    _a_server_url = field_validator("base_url")(server_url)  # the error names the flag, override or file

    _a_known_backend = field_validator("backend")(known_backend)

    def key(self) -> tuple:
        """What makes two roles the same loaded model (one backend serves both)."""
        return (self.backend, self.model, self.base_url, self.api_key_env, self.timeout, self.concurrency)


class TeacherSettings(BaseModel):
    """What every teach verb decides: the teacher, how it samples, and how the batch runs. A verb's
    settings add their own keys, name the roles they load (``ROLES``) and what else decides their
    output (``DECIDES``), so ``digest`` covers exactly that."""

    model_config = ConfigDict(extra="forbid")
    ROLES: ClassVar[tuple[str, ...]] = ("teacher",)
    DECIDES: ClassVar[tuple[str, ...]] = ("temperature", "max_tokens", "critique_tokens", "attempts", "seed")
    VERSION: ClassVar[str] = ""  # the prompts' version: new prompts make a different job

    teacher: Role = Field(default_factory=Role, description="the model that critiques, checks and rewrites")
    temperature: float = Field(0.0, ge=0, description="sampling temperature of every call")
    max_tokens: int = Field(256, ge=1, description="tokens per draft and per rewrite")
    critique_tokens: int = Field(320, ge=16, description="tokens per critique and per verification")
    attempts: int = Field(3, ge=1, description="asks per structured answer before the item fails")
    concurrency: int | None = Field(None, ge=1, description="items in flight at once (default: the teacher's parallel requests)")
    cache: bool = Field(True, description="reuse answers from the call cache")
    seed: int = Field(0, description="the seed of every call")

    def digest(self) -> str:
        """What decides the output: a re-run with other values is a different job."""
        roles = {name: {k: getattr(getattr(self, name), k) for k in ("backend", "model", "base_url")}
                 for name in self.ROLES}
        values = roles | {k: getattr(self, k) for k in self.DECIDES} | {"v": self.VERSION}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


class TeachSettings(TeacherSettings):
    """Everything that decides a ``teach dcr`` run (and, extended, adaptive teaching), as
    ``--config FILE`` holds it."""

    ROLES: ClassVar[tuple[str, ...]] = ("teacher", "student")
    DECIDES: ClassVar[tuple[str, ...]] = ("max_iterations", "threshold", *TeacherSettings.DECIDES)
    VERSION: ClassVar[str] = PROMPT_VERSION

    student: Role = Field(default_factory=Role, description="the model that drafts (when a row has no draft)")
    max_iterations: int = Field(3, ge=1, description="drafts the teacher critiques per item, at most")
    threshold: float = Field(0.8, ge=0, le=1, description="a score this high ends an item's iterations")


def load_teach_settings(path: str | Path | None = None, overrides: list[str] = (),
                        flags: dict | None = None) -> TeachSettings:
    """``TeachSettings`` from a config file, ``key=value`` overrides and flags (``teacher.backend``
    style keys for the sections)."""
    return load_settings(TeachSettings, path, overrides, flags)
