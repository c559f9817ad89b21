"""The backend registry: backends by name, as plain data, imported only when used.

``REGISTRY`` maps a name to where its class lives and which modules it needs. Checking whether
a backend is available looks for those modules without importing them, so ``localforge --help``
and ``doctor`` stay fast. ``choose_auto`` is a pure function of the hardware profile, what is
installed and which local servers answer, so it can be tested against machines we lack.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from localforge.backends.base import (
    Backend,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Capabilities,
    ChatResult,
    GenerationParams,
    InvalidResponse,
    RequestTooLarge,
    Unsupported,
)
from localforge.errors import ConfigError

if TYPE_CHECKING:
    from localforge.hardware import HardwareProfile

__all__ = [
    "Backend", "BackendError", "BackendTimeout", "BackendUnavailable", "Capabilities",
    "ChatResult", "GenerationParams", "InvalidResponse", "RequestTooLarge", "Unsupported",
    "REGISTRY", "BackendSpec", "availability", "choose_auto", "get_backend", "backend_class",
]


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class"
    requires: tuple[str, ...]  # import names that must be installed
    extra: str  # the pip extra that installs them
    runs_on: str  # for the README table and doctor
    server: bool = False  # talks to a server (auto only picks it when one answers)


REGISTRY: dict[str, BackendSpec] = {
    s.name: s
    for s in [
        BackendSpec("mlx", "localforge.backends.mlx.generate:MLXBackend", ("mlx", "mlx_lm"),
                    "mlx", "Apple Silicon (Metal); Linux CPU via mlx[cpu]"),
        BackendSpec("torch", "localforge.backends.torch.generate:TorchBackend",
                    ("torch", "transformers"), "torch", "CPU, CUDA, MPS"),
        BackendSpec("llamacpp", "localforge.backends.llamacpp:LlamaCppBackend", ("llama_cpp",),
                    "llamacpp", "CPU, Metal, CUDA (GGUF files)"),
        BackendSpec("vllm", "localforge.backends.vllm_engine:VLLMBackend", ("vllm",), "vllm",
                    "NVIDIA GPUs (offline engine)"),
        BackendSpec("openai", "localforge.backends.openai_server:OpenAIBackend", ("openai",), "",
                    "any OpenAI-compatible server ($OPENAI_BASE_URL)", server=True),
        BackendSpec("lmstudio", "localforge.backends.openai_server:LMStudioBackend", ("openai",), "",
                    "LM Studio server (http://localhost:1234/v1)", server=True),
        BackendSpec("vllm-server", "localforge.backends.openai_server:VLLMServerBackend", ("openai",), "",
                    "vLLM server (http://localhost:8000/v1)", server=True),
        BackendSpec("ollama", "localforge.backends.ollama_server:OllamaBackend", ("ollama",), "",
                    "Ollama server (http://localhost:11434, $OLLAMA_HOST)", server=True),
    ]
}


def availability(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` can be used here, and why not. Imports nothing."""
    spec = REGISTRY.get(name)
    if spec is None:
        return False, f"unknown backend '{name}'"
    for module in spec.requires:
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            target = f"'localforge[{spec.extra}]'" if spec.extra else "localforge"
            return False, f"'{module}' is not installed: pip install {target}"
    return True, "client installed (server not checked)" if spec.server else "installed"


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise ConfigError(
            f"unknown backend '{name}': choose one of {', '.join(['auto', *REGISTRY])}"
        )
    ok, reason = availability(name)
    if not ok:
        raise BackendUnavailable(f"backend '{name}' is not available: {reason}")
    module, cls = REGISTRY[name].target.split(":")
    return getattr(importlib.import_module(module), cls)


def choose_auto(
    profile: HardwareProfile,
    available: dict[str, bool],
    answering_servers: tuple[str, ...] = (),
    model_formats: tuple[str, ...] = ("hf", "gguf"),
) -> str:
    """Pick a backend for this machine.

    MLX on Apple Silicon; vLLM (when installed) or torch on NVIDIA; a local server that
    answers; llama.cpp in-process for GGUF models; torch on the CPU. ``available`` maps
    backend names to whether they are installed; ``model_formats`` says what the model has.
    """

    def usable(name: str, fmt: str | None = None) -> bool:
        return available.get(name, False) and (fmt is None or fmt in model_formats)

    can_hf = "hf" in model_formats or "gguf" in model_formats  # a GGUF converts to HF
    if profile.apple_silicon and usable("mlx") and can_hf:
        return "mlx"
    if profile.has_cuda:
        if usable("vllm") and can_hf:
            return "vllm"
        if usable("torch") and can_hf:
            return "torch"
    for server in answering_servers:
        if usable(server):
            return server
    if usable("llamacpp", "gguf"):
        return "llamacpp"
    if usable("torch") and can_hf:
        return "torch"
    if usable("mlx") and can_hf:
        return "mlx"
    raise BackendUnavailable(
        "no backend is installed for this machine: pip install 'localforge[torch]' "
        "(or [mlx] on Apple Silicon, [llamacpp] for GGUF files)"
    )


def get_backend(name: str = "auto", model: str | None = None, **options: Any) -> Backend:
    """Build a backend by name (or ``auto``) for ``model`` (an alias, folder, file or repo id)."""
    from localforge.models import DEFAULT_MODEL

    model = model or DEFAULT_MODEL
    adapter = options.get("adapter")
    if name == "auto":
        name = resolve_auto(model, adapter=bool(adapter))
    cls = backend_class(name)
    if adapter and not cls.capabilities.lora_adapters:
        raise Unsupported(
            f"the {name} backend cannot load LoRA adapters here: use --backend torch or mlx, "
            "or `localforge adapters fuse` and load the fused model"
        )
    return cls(model, **options)


def resolve_auto(model: str, adapter: bool = False) -> str:
    """``choose_auto`` for this machine; with ``adapter``, only among backends that load one."""
    from localforge.hardware import HardwareProfile
    from localforge.models import resolve

    resolved = resolve(model)
    formats = tuple(f for f, p in (("hf", resolved.hf_path), ("gguf", resolved.gguf_path)) if p)
    from localforge.backends.server import answering_local_servers

    available = {n: availability(n)[0] for n in REGISTRY}
    if adapter:
        available = {n: ok and backend_class(n).capabilities.lora_adapters for n, ok in available.items()}
    servers = () if adapter else answering_local_servers()
    return choose_auto(HardwareProfile.detect(), available, servers, formats)
