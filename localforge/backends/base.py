"""The one interface that extract, teach and finetune speak to.

A backend turns conversations (lists of ``{"role", "content"}`` messages) into completions.
In-process backends (torch, mlx, llamacpp) load a model; server backends talk to an endpoint.
Everything engine-specific stays behind this interface.

A backend does one job: ``generate`` a batch of conversations; ``stream`` writes one conversation's
answer as it is generated (text deltas), where the engine can. What sits on top of any backend
lives in its own module: the call cache (``cache.Cached``) and structured output
(``structured.generate_json``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Sequence
from typing import Any, ClassVar

from localforge.backends.types import (
    Capabilities,
    ChatResult,
    Conversation,
    GenerationParams,
    Health,
    Stream,
    Unsupported,
    check_conversation,
    first_line,
    is_conversation,
)


class Backend(ABC):
    """Subclasses implement ``generate`` for a batch of conversations; ``chat`` is shared."""

    name: ClassVar[str] = ""
    capabilities: Capabilities = Capabilities()  # servers set their own per instance (parallel)
    adapter_key: str | None = None  # a hash of the loaded LoRA adapter, if any (cache keys)
    model_name: str = ""  # the model as results name it

    def __init__(self, model: str, **options: Any):
        self.model_ref = model
        self.options = options

    @abstractmethod
    def generate(self, conversations: list[Conversation], params: GenerationParams) -> list[ChatResult]:
        """One completion per conversation, in order. Conversations and parameters are checked."""

    def identity(self) -> tuple:
        """What names this backend's model for caches and remembered probes."""
        if self.adapter_key:
            return (self.name, self.model_ref, self.adapter_key)
        return (self.name, self.model_ref)

    def result(self, text: str, prompt_tokens: int, completion_tokens: int, finish: str | None,
               seconds: float) -> ChatResult:
        """A ``ChatResult`` from this backend and model; any finish reason but "length" reads as "stop"."""
        return ChatResult(text=text, prompt_tokens=int(prompt_tokens), completion_tokens=int(completion_tokens),
                          finish_reason="length" if finish == "length" else "stop", latency_s=seconds,
                          backend=self.name, model=self.model_name)

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
        single = is_conversation(conversations)
        batch = [conversations] if single else [list(c) for c in conversations]
        for i, conv in enumerate(batch):
            check_conversation(conv, i)
        self._check_params(params)
        if not batch:
            return []
        results = self.generate(batch, params)
        return results[0] if single else results

    def _check_params(self, params: GenerationParams) -> None:
        """Refuse a structured-output mode this backend does not have (``Unsupported``)."""
        if params.grammar is not None and not self.capabilities.grammar:
            raise Unsupported(f"backend '{self.name}' cannot constrain output to a grammar; use generate_json instead")
        if params.json_object:  # JSON mode (json_schema, if given, is only a hint)
            if not self.capabilities.json_mode:
                raise Unsupported(f"backend '{self.name}' has no JSON mode; use generate_json instead")
        elif params.json_schema is not None and not self.capabilities.json_schema:
            raise Unsupported(
                f"backend '{self.name}' cannot constrain output to a JSON schema; "
                "use generate_json (it falls back to prompting), or a backend that can"
            )

    def stream(self, conversation: Conversation, params: GenerationParams | None = None,
               **overrides: Any) -> Stream:
        """Complete one conversation as a ``Stream``: iterate it for text deltas as the engine
        writes them; once it ends, its ``result`` holds the usage and finish reason, as ``chat``
        returns them. Checked as ``chat`` checks (conversation, grammar and JSON capabilities).

        Engines that can stream override ``_stream``; the default runs ``generate`` and yields its
        whole text as one delta.
        """
        params = (params or GenerationParams()).with_(**overrides)
        conv = list(conversation)
        check_conversation(conv, 0)
        self._check_params(params)
        return Stream(self._stream(conv, params))

    def _stream(self, conv: Conversation, params: GenerationParams) -> Generator[str, None, ChatResult]:
        """Text deltas of one completion, returning its ``ChatResult``. This default is not
        streaming: it generates the whole answer, then yields it as one delta."""
        result = self.generate([conv], params)[0]
        if result.text:
            yield result.text
        return result

    def health(self) -> Health:
        """A cheap check that the backend can answer; never raises."""
        try:
            self.chat([{"role": "user", "content": "Hi"}], max_tokens=1)
            return Health(True, "ok")
        except Exception as exc:  # noqa: BLE001 - health reports, it never raises
            return Health(False, first_line(exc))

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release the model or connection. Safe to call twice."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
