"""The plain types every backend and every caller share: messages, parameters, results, errors.

A leaf module: it imports nothing from localforge but ``errors``, so any layer can use it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from localforge.errors import ConfigError, LocalforgeError

Message = dict[str, str]
Conversation = list[Message]
ROLES = ("system", "user", "assistant", "tool")


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


class RequestTooLarge(BackendError, ConfigError):
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
    grammar: str | None = None  # a llama.cpp grammar (GBNF) the output must follow (Capabilities.grammar)

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
    """What one loaded backend can do; callers read it instead of checking classes."""

    batching: bool = False  # one call generates several conversations together
    json_schema: bool = False  # output can be constrained to a JSON schema (native mode)
    json_mode: bool = False  # output can be constrained to JSON of any shape
    grammar: bool = False  # output can be constrained to a GBNF grammar (llama.cpp; a server: probed)
    parallel: int = 1  # requests it runs at once (a server's concurrency); in-process engines: 1


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str


# --- small helpers --------------------------------------------------------------------------


def is_conversation(obj: Any) -> bool:
    """A list of message dicts (one conversation), as opposed to a batch; [] is an empty batch."""
    return isinstance(obj, list | tuple) and len(obj) > 0 and isinstance(obj[0], dict)


def check_conversation(conv: Conversation, index: int) -> None:
    if not conv:
        raise LocalforgeError(f"conversation {index} is empty: give at least one message")
    for j, msg in enumerate(conv):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise LocalforgeError(
                f"conversation {index}, message {j}: expected {{'role': ..., 'content': ...}}"
            )
        if msg["role"] not in ROLES:
            raise LocalforgeError(
                f"conversation {index}, message {j}: unknown role '{msg['role']}' "
                "(use system, user, assistant or tool)"
            )


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; return the text and whether one was found."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def context_length(config: Any) -> int | None:
    """A model's context length from its config (a transformers config object or a config.json dict)."""
    for key in CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_to_context(backend: str, model: str, prompt_lengths: Sequence[int], max_tokens: int,
                   context: int | None) -> int:
    """Refuse a prompt that does not fit the context (before any work, as llama.cpp does: past it
    a model writes garbage); else the max_tokens that fit after the longest prompt (at least 1)."""
    if context is None:
        return max_tokens
    for i, n in enumerate(prompt_lengths):
        if n >= context:
            which = f"conversation {i}'s prompt" if len(prompt_lengths) > 1 else "the prompt"
            raise RequestTooLarge(
                f"{backend}: {which} is {n} tokens and {model} has a context of {context} tokens: "
                "use shorter input (or a smaller chunk_size), or a model with a longer context"
            )
    return max(1, min(max_tokens, context - max(prompt_lengths, default=0)))


def stream_cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """What of ``text`` (a streamed answer so far) may be sent now: cut at the earliest stop string
    (and True), else all but a tail that could still become a stop string or an unfinished UTF-8
    character (decoders write U+FFFD for one), which the next tokens decide."""
    cut, hit = truncate_at_stop(text, stop)
    if hit:
        return cut, True
    keep = len(text)
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = min(keep, len(text) - n)
                break
    while keep and text[keep - 1] == "\ufffd":
        keep -= 1
    return text[:keep], False


class Stream:
    """One completion as it is written: iterate for text deltas (``str``); once the iteration
    ends, ``result`` is the ``ChatResult`` (the whole text, token usage, finish reason, seconds).

    ``close()`` stops the generation early (a client that went away): the engine stops at its
    next token, and ``result`` stays None.
    """

    def __init__(self, deltas: Any):
        self._gen = deltas  # a generator of str that returns the ChatResult
        self.result: ChatResult | None = None

    def __iter__(self):
        self.result = yield from self._gen
        return self.result

    def text(self) -> str:
        """Run it to the end and return the whole text."""
        return "".join(self)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def first_line(exc: BaseException) -> str:
    """An exception as one line: its message's first line, or its class name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
