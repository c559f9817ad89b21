"""Backends: every engine behind one interface, found by name in one registry.

``get_backend(name, model)`` builds one (``auto`` picks for this machine); the call cache and
structured output are layered on top of any backend (``cache=`` and ``generate_json``). Engines
are imported only when used, so importing this package stays fast.
"""

from __future__ import annotations

from typing import Any

from localforge.backends.base import Backend
from localforge.backends.gguf_export import (
    EXPORT_TARGETS,
    GGUF_TYPES,
    converter,
    install_converter,
    to_gguf,
)
from localforge.backends.hf import ensure_hf, load_tokenizer
from localforge.backends.registry import (
    REGISTRY,
    availability,
    backend_class,
    choose,
    installed,
    load,
    require,
    spec,
    trainers,
)
from localforge.backends.spec import EngineSpec
from localforge.backends.structured import (
    StructuredOutputError,
    describe_schema,
    forget_probes,
    generate_json,
    structured_modes,
)
from localforge.backends.types import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Capabilities,
    ChatResult,
    Conversation,
    GenerationParams,
    InvalidResponse,
    RequestTooLarge,
    Unsupported,
)
from localforge.errors import ConfigError, LocalforgeError, UsageError

__all__ = [
    "Backend", "BackendError", "BackendTimeout", "BackendUnavailable", "Capabilities", "ChatResult",
    "Conversation", "EngineSpec", "GenerationParams", "InvalidResponse", "RequestTooLarge",
    "StructuredOutputError", "Unsupported", "REGISTRY", "availability", "backend_class", "check_server_options",
    "choose",
    "describe_schema", "ensure_hf", "load_tokenizer", "forget_probes", "fuse", "generate_json", "get_backend", "installed",
    "known_backend", "load", "require", "resolve_auto", "served_models", "spec", "structured_modes", "trainers",
    "EXPORT_TARGETS", "GGUF_TYPES", "converter", "install_converter", "to_gguf",
]

# what only a server takes; in-process engines run without them
SERVER_OPTIONS = ("base_url", "api_key_env", "timeout", "concurrency")


def get_backend(name: str = "auto", model: str | None = None, *, cache: Any = None, **options: Any) -> Backend:
    """Build a backend by name (or ``auto``) for ``model`` (an alias, folder, file or repo id).

    ``cache``: None (off), True (the default cache file), a path, or a ``CallCache``. Server
    options (``base_url``, ``api_key_env``, ``timeout``, ``concurrency``) left at None take the
    server's defaults; in-process engines refuse a ``base_url`` and need none of them.
    """
    from localforge.backends.cache import with_cache
    from localforge.models import DEFAULT_MODEL

    model = model or DEFAULT_MODEL
    adapter = options.get("adapter")
    check_server_options(name, options.get("base_url"))
    if name == "auto":
        name = resolve_auto(model, adapter=bool(adapter))
    s = spec(name)
    if s.server:
        options = {k: v for k, v in options.items() if v is not None or k not in SERVER_OPTIONS}
    else:
        options = {k: v for k, v in options.items() if k not in SERVER_OPTIONS}
    if adapter and not s.adapters:
        loaders = " or ".join(n for n, x in REGISTRY.items() if x.adapters)
        raise Unsupported(
            f"the {name} backend cannot load LoRA adapters here: use --backend {loaders}, "
            "or `localforge adapters fuse` and load the fused model"
        )
    return with_cache(backend_class(name)(model, **options), cache)


def check_server_options(name: str, base_url: str | None, where: str = "--base-url") -> None:
    """A server URL given to ``auto`` or to an in-process backend, or one that is not a URL
    (``ht!tp://x``; a bare ``host:port`` is taken as ``http://host:port``), is a one-line error.
    ``where`` names the URL's source: a flag (``--base-url``, a ``UsageError``) or a config key
    (``base_url in FILE``, a ``ConfigError``)."""
    if not base_url:
        return
    error = UsageError if where.startswith("--") else ConfigError
    if name == "auto":
        servers = [n for n, s in REGISTRY.items() if s.server]
        raise error(f"{where or 'a server URL'} needs a server backend: --backend {' or '.join(servers)}")
    if not spec(name).server:
        raise error(f"{where or 'a server URL'} is for server backends; backend '{name}' runs in-process")
    from localforge.backends.server import normalize_url

    normalize_url(base_url, where)


def known_backend(cls, value: str) -> str:
    """A pydantic field validator for a settings model's ``backend``: auto or a registered name
    (the error then names the key, the flag or the override)."""
    if value != "auto" and value not in REGISTRY:
        raise ValueError(f"unknown backend {value!r}: choose one of {', '.join(['auto', *REGISTRY])}")
    return value


def server_url(cls, value: str | None, info) -> str | None:
    """A pydantic field validator for a settings model's ``base_url`` (after its ``backend``):
    ``_url = field_validator("base_url")(server_url)``. A URL given to a backend that takes none,
    or one that is not a URL, is a validation error, so the settings loader names the flag, the
    override or the file it came from."""
    try:
        check_server_options(info.data.get("backend", "auto"), value, where="")
    except LocalforgeError as exc:
        raise ValueError(str(exc).strip()) from None
    return value


def resolve_auto(model: str, adapter: bool = False) -> str:
    """``choose`` for this machine and ``model``; with ``adapter``, only among backends that load one.
    A reference an engine claims by its prefix (``ollama:TAG``) is that engine's."""
    from localforge.backends.server import answering_local_servers
    from localforge.hardware import HardwareProfile
    from localforge.models import resolve

    for s in REGISTRY.values():
        if s.model_prefix and model.startswith(s.model_prefix):
            return s.name
    resolved = resolve(model)
    formats = tuple(f for f, p in (("hf", resolved.hf_path), ("gguf", resolved.gguf_path)) if p)
    servers = () if adapter else answering_local_servers()
    return choose(HardwareProfile.detect(), installed(), servers, formats, adapters=adapter)[0]


def served_models(name: str, **options: Any) -> list[str]:
    """What the server behind backend ``name`` offers."""
    s = spec(name)
    if not s.server:
        raise ConfigError(f"models list --backend lists what a server offers; '{name}' runs in-process")
    with backend_class(name)("", **{k: v for k, v in options.items() if v is not None}) as be:
        return be.list_models()


def fuse(adapter, out, base: str | None = None):
    """Merge a LoRA adapter into its base model with the first installed engine that can."""
    for name, s in REGISTRY.items():
        if s.fuse and availability(name)[0]:
            return load(s.fuse)(adapter, out, base)
    from localforge.errors import MissingDependency

    raise MissingDependency("fusing an adapter", next(s.extra for s in REGISTRY.values() if s.fuse))
