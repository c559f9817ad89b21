"""The one interface that extract, teach and finetune speak to.

A backend turns conversations (lists of ``{"role", "content"}`` messages) into completions.
In-process backends (torch, mlx, llamacpp) load a model; server backends talk to an
endpoint. Everything engine-specific stays behind this interface.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

from localforge.errors import LocalforgeError

Message = dict[str, str]
Conversation = list[Message]


# --- errors -------------------------------------------------------------------------------


class BackendError(LocalforgeError):
    """Base of all backend errors; the message says what to do."""


class BackendUnavailable(BackendError):
    """The engine is not installed, the server does not answer, or the device is missing."""


class BackendTimeout(BackendError):
    """A request took longer than its timeout."""


class InvalidResponse(BackendError):
    """The engine answered with something that is not a usable completion."""


class Unsupported(BackendError):
    """The backend cannot do what was asked (a parameter, a capability)."""


class RequestTooLarge(BackendError):
    """The conversation and max_tokens do not fit the model's context window."""


# --- plain data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters shared by every backend.

    ``temperature == 0`` means greedy decoding. ``json_schema`` asks for output constrained to
    a JSON schema where the backend can (see ``Capabilities.json_schema``).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    json_schema: dict[str, Any] | None = None  # constrain output to this schema (native mode)
    json_object: bool = False  # ask for any JSON value (the engine's JSON mode)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise LocalforgeError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise LocalforgeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LocalforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes: Any) -> GenerationParams:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class ChatResult:
    """One completion: the text, its token usage, why it ended and how long it took."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    latency_s: float
    backend: str = ""
    model: str = ""
    cached: bool = False  # answered from the call cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Capabilities:
    batching: bool = False  # one call generates several conversations together
    json_schema: bool = False  # output can be constrained to a JSON schema (native mode)
    json_mode: bool = False  # output can be constrained to JSON of any shape
    lora_training: bool = False  # the engine can train LoRA adapters here
    grpo: bool = False  # the engine can run GRPO
    lora_adapters: bool = False  # generation can load a LoRA adapter (mlx-lm or PEFT folder)


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str


# --- the interface --------------------------------------------------------------------------


class Backend(ABC):
    """Subclasses implement ``_generate`` for a batch of conversations; the rest is shared."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    adapter_key: str | None = None  # a hash of the loaded LoRA adapter, if any (cache keys)
    model_name: str = ""  # the model as results name it

    def __init__(self, model: str, cache: Any = None, **options: Any):
        """``cache``: None (off), True (the default cache file), a path, or a ``CallCache``."""
        self.model_ref = model
        self.options = options
        self.cache = _open_cache(cache)

    def result(self, text: str, prompt_tokens: int, completion_tokens: int, finish: str | None,
               seconds: float) -> ChatResult:
        """A ``ChatResult`` from this backend and model; any finish reason but "length" reads as "stop"."""
        return ChatResult(text=text, prompt_tokens=int(prompt_tokens), completion_tokens=int(completion_tokens),
                          finish_reason="length" if finish == "length" else "stop", latency_s=seconds,
                          backend=self.name, model=self.model_name)

    # Subclasses: generate one completion per conversation, in order.
    @abstractmethod
    def _generate(
        self, conversations: list[Conversation], params: GenerationParams
    ) -> list[ChatResult]: ...

    def chat(
        self,
        conversations: Conversation | Sequence[Conversation],
        params: GenerationParams | None = None,
        **overrides: Any,
    ) -> ChatResult | list[ChatResult]:
        """Complete one conversation (returns a ``ChatResult``) or a batch (returns a list).

        ``overrides`` are ``GenerationParams`` fields, e.g. ``chat(msgs, max_tokens=32)``.
        """
        params = (params or GenerationParams()).with_(**overrides)
        single = _is_conversation(conversations)
        batch = [conversations] if single else [list(c) for c in conversations]
        for i, conv in enumerate(batch):
            _check_conversation(conv, i)
        if params.json_object:  # JSON mode (json_schema, if given, is only a hint)
            if "json" not in self.structured_modes():
                raise Unsupported(f"backend '{self.name}' has no JSON mode; use generate_json instead")
        elif params.json_schema is not None and "schema" not in self.structured_modes():
            raise Unsupported(
                f"backend '{self.name}' cannot constrain output to a JSON schema; "
                "use generate_json (it falls back to prompting), or a backend that can"
            )
        if not batch:
            return []
        results = self._cached_generate(batch, params) if self.cache is not None else self._generate(batch, params)
        return results[0] if single else results

    def _cache_lookup(self, batch: list[Conversation], params: GenerationParams):
        """The cache key of each conversation, and its cached result (or None)."""
        from localforge.backends.cache import call_key

        keys = [call_key(self._probe_key(), params, conv) for conv in batch]
        hits = [self.cache.get(key) for key in keys]
        return keys, [ChatResult(**{**hit, "cached": True}) if hit else None for hit in hits]

    def _cached_generate(self, batch: list[Conversation], params: GenerationParams) -> list[ChatResult]:
        """Generate the misses in one batch, then store them. Server backends override this to
        store each answer as it arrives."""
        keys, results = self._cache_lookup(batch, params)
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            for i, fresh in zip(todo, self._generate([batch[i] for i in todo], params), strict=True):
                self.cache.put(keys[i], fresh.to_dict())
                results[i] = fresh
        return results  # type: ignore[return-value]

    # --- structured output -------------------------------------------------------------------

    _unsupported: ClassVar[dict[tuple, set[str]]] = {}  # probe results, shared per server+model

    def _probe_key(self) -> tuple:
        if self.adapter_key:
            return (self.name, self.model_ref, self.adapter_key)
        return (self.name, self.model_ref)

    def structured_modes(self) -> list[str]:
        """The structured-output ladder for this backend, best first; ends with "prompt"."""
        native = [m for m, ok in (("schema", self.capabilities.json_schema),
                                  ("json", self.capabilities.json_mode)) if ok]
        known_bad = self._unsupported.get(self._probe_key(), set())
        return [m for m in native if m not in known_bad] + ["prompt"]

    def mark_unsupported(self, mode: str) -> None:
        self._unsupported.setdefault(self._probe_key(), set()).add(mode)

    def forget_probes(self) -> None:
        """Probe this server and model's structured-output modes again (after an upgrade, say)."""
        self._unsupported.pop(self._probe_key(), None)

    def generate_json(self, conversation: Conversation, schema: Any,
                      params: GenerationParams | None = None, attempts: int = 3) -> Any:
        """An object that validates against ``schema`` (dict or pydantic model); see structured.py."""
        from localforge.backends.structured import generate_json

        return generate_json(self, conversation, schema, params, attempts)

    def health(self) -> Health:
        """A cheap check that the backend can answer; never raises."""
        try:
            self.chat([{"role": "user", "content": "Hi"}], max_tokens=1)
            return Health(True, "ok")
        except Exception as exc:  # noqa: BLE001 - health reports, it never raises
            return Health(False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release the model or connection. Safe to call twice."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- helpers shared by backends -----------------------------------------------------------


def _open_cache(cache: Any):
    if cache is None or cache is False:
        return None
    from localforge.backends.cache import CallCache

    if isinstance(cache, CallCache):
        return cache
    return CallCache(None if cache is True else cache)


def _is_conversation(obj: Any) -> bool:
    """A list of message dicts (one conversation), as opposed to a batch; [] is an empty batch."""
    return isinstance(obj, list | tuple) and len(obj) > 0 and isinstance(obj[0], dict)


def _check_conversation(conv: Conversation, index: int) -> None:
    if not conv:
        raise LocalforgeError(f"conversation {index} is empty: give at least one message")
    for j, msg in enumerate(conv):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise LocalforgeError(
                f"conversation {index}, message {j}: expected {{'role': ..., 'content': ...}}"
            )
        if msg["role"] not in ("system", "user", "assistant", "tool"):
            raise LocalforgeError(
                f"conversation {index}, message {j}: unknown role '{msg['role']}' "
                "(use system, user, assistant or tool)"
            )


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; return the text and whether one was found."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
