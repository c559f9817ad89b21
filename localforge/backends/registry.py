"""The one registry of engines: their specs, whether they are installed, and the ``auto`` choice.

Each engine declares ``SPECS`` in its own folder or module (see ``spec.py``); ``ENGINES`` lists
those modules, and ``REGISTRY`` maps every backend name to its spec. Nothing here imports an
engine: availability is read with ``find_spec``, and a class is imported by ``load`` only when it
is used. ``choose`` is a pure function of the hardware profile, what is installed and which
local servers answer, for generation and for training alike, so it is tested against machines
we lack.
"""

from __future__ import annotations

import importlib
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from localforge.backends.spec import EngineSpec
from localforge.backends.types import BackendUnavailable
from localforge.errors import ConfigError

if TYPE_CHECKING:
    from localforge.hardware import HardwareProfile

# modules under localforge.backends that declare SPECS, in the order doctor lists them
ENGINES = ("mlx", "torch", "llamacpp", "vllm_engine", "openai_server", "ollama_server")


def _read_specs() -> dict[str, EngineSpec]:
    found: dict[str, EngineSpec] = {}
    for module in ENGINES:
        for s in importlib.import_module(f"localforge.backends.{module}").SPECS:
            found[s.name] = s
    return found


REGISTRY: dict[str, EngineSpec] = _read_specs()


def spec(name: str) -> EngineSpec:
    if name not in REGISTRY:
        raise ConfigError(f"unknown backend '{name}': choose one of {', '.join(['auto', *REGISTRY])}")
    return REGISTRY[name]


def trainers() -> list[str]:
    """Backends that train, in registry order."""
    return [n for n, s in REGISTRY.items() if s.trains]


def availability(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` can be used here, and why not. Imports nothing."""
    s = REGISTRY.get(name)
    if s is None:
        return False, f"unknown backend '{name}'"
    for module in s.requires:
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            target = f"'localforge[{s.extra}]'" if s.extra else "localforge"
            return False, f"'{module}' is not installed: pip install {target}"
    return True, "client installed (server not checked)" if s.server else "installed"


def installed(names: list[str] | None = None) -> dict[str, bool]:
    return {n: availability(n)[0] for n in (names if names is not None else REGISTRY)}


def require(name: str) -> EngineSpec:
    """The spec of an installed backend; one-line errors for unknown and missing ones."""
    s = spec(name)
    ok, reason = availability(name)
    if not ok:
        raise BackendUnavailable(f"backend '{name}' is not available: {reason}")
    return s


def load(target: str) -> Any:
    """What a spec points at ("module:attribute"), imported now."""
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def backend_class(name: str):
    return load(require(name).generate)


# --- auto ---------------------------------------------------------------------------------------

ACCELERATORS = {"metal": "the Apple GPU (Metal)", "cuda": "the CUDA GPU"}


def _accelerator(profile: HardwareProfile) -> str | None:
    if profile.apple_silicon:
        return "metal"
    return "cuda" if profile.has_cuda else None


def choose(
    profile: HardwareProfile,
    available: dict[str, bool],
    answering_servers: tuple[str, ...] = (),
    model_formats: tuple[str, ...] = ("hf", "gguf"),
    *,
    train: str | None = None,
    adapters: bool = False,
) -> tuple[str, str]:
    """The backend ``auto`` means on this machine, and why.

    First an engine that prefers this machine's accelerator (MLX on Apple Silicon; vLLM, then
    torch, on NVIDIA); then a local server that answers; then an engine that runs on the CPU, by
    rank (llama.cpp for GGUF models, torch, MLX). ``available`` maps backend names to whether they
    are installed; ``model_formats`` says what files the model has. ``train`` (a method such as
    "lora") chooses among engines that train it; ``adapters`` among those that load an adapter.
    """

    def fits(s: EngineSpec) -> bool:
        if not available.get(s.name, False) or (adapters and not s.adapters):
            return False
        if train is not None:
            return train in s.methods
        return s.server or bool(set(s.formats) & set(model_formats))

    engines = sorted((s for s in REGISTRY.values() if fits(s) and not s.server), key=lambda s: s.rank)
    accel = _accelerator(profile)
    for s in engines:
        if accel in s.prefers:
            return s.name, f"{s.label} on {ACCELERATORS[accel]}"
    if train is None:
        for name in answering_servers:
            if name in REGISTRY and fits(REGISTRY[name]):
                return name, f"a local {REGISTRY[name].label} server answers"
    for s in engines:
        if "cpu" in s.devices:
            return s.name, f"{s.label} on the CPU" + (f" (nothing installed runs it on {ACCELERATORS[accel]})"
                                                        if accel else "")
    if train is not None:
        raise BackendUnavailable(f"no installed backend trains '{train}' on this machine: "
                                 "pip install 'localforge[torch]' (or [mlx] on Apple Silicon)")
    raise BackendUnavailable(
        "no backend is installed for this machine: pip install 'localforge[torch]' "
        "(or [mlx] on Apple Silicon, [llamacpp] for GGUF files)"
    )
