"""Ollama through the official ``ollama`` client (default http://localhost:11434; $OLLAMA_HOST).

An API key (Ollama's hosted service, or a proxy in front of a server) is read from the variable
``api_key_env`` names, else from ``OLLAMA_API_KEY`` as the client does, and sent as a bearer token.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from localforge.backends.resilience import Transient
from localforge.backends.server import ServerBackend
from localforge.backends.spec import EngineSpec
from localforge.backends.types import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Capabilities,
    ChatResult,
    Conversation,
    GenerationParams,
    InvalidResponse,
    Timer,
)

SPECS = (
    EngineSpec(name="ollama", label="Ollama", extra="", runs_on="Ollama server (http://localhost:11434, $OLLAMA_HOST)",
               generate="localforge.backends.ollama_server:OllamaBackend", requires=("ollama",), devices=(),
               formats=("served",), server=True, model_prefix="ollama:"),
)


class OllamaBackend(ServerBackend):
    name = "ollama"
    default_url = "http://localhost:11434"
    url_env = "OLLAMA_HOST"
    start_hint = "start Ollama (`ollama serve`, or the desktop app) or set OLLAMA_HOST"
    capabilities = Capabilities(batching=True, json_schema=True, json_mode=True)

    def __init__(self, model: str, api_key_env: str | None = None, **options: Any):
        super().__init__(model, **options)
        import os

        import httpx
        import ollama

        self._ollama, self._httpx = ollama, httpx
        host = self.base_url if "://" in self.base_url else f"http://{self.base_url}"
        self.base_url = host
        key = os.environ.get(api_key_env) if api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self.client = ollama.Client(host=host, timeout=self.timeout, headers=headers)

    def _request(self, conv: Conversation, params: GenerationParams, timeout: float, probing: bool) -> ChatResult:
        options, fmt = self._options(params)
        try:
            with Timer() as t:
                out = self.client.chat(model=self.served, messages=conv, options=options, format=fmt, stream=False)
        except Exception as exc:
            raise self._call_error(exc, probing) from None
        try:
            return self.result(out.message.content or "", out.prompt_eval_count or 0, out.eval_count or 0,
                               out.done_reason, t.seconds)
        except (AttributeError, TypeError, ValueError) as exc:
            raise InvalidResponse(f"{self.base_url} returned an unexpected chat response: {exc}") from None

    def _stream(self, conv: Conversation, params: GenerationParams) -> Generator[str, None, ChatResult]:
        """Ollama's NDJSON stream: a delta per line, the counts and the done reason on the last.
        A structured-output mode is answered whole, as one delta (its probing lives in ``_call``)."""
        import time

        if params.json_object or params.json_schema is not None:
            result = self._call(conv, params)
            if result.text:
                yield result.text
            return result
        options, _ = self._options(params)
        t0 = time.perf_counter()

        def open_stream(left: float):
            try:
                chunks = self.client.chat(model=self.served, messages=conv, options=options, stream=True)
                return chunks, next(chunks, None)  # the request goes out on the first read
            except Exception as exc:
                raise self._call_error(exc, False) from None

        chunks, first = self.endpoint.call(open_stream, self.timeout)
        text, last = [], first
        try:
            chunk = first
            while chunk is not None:
                piece = chunk.message.content if chunk.message else None
                if piece:
                    text.append(piece)
                    yield piece
                last = chunk
                chunk = next(chunks, None)
        except Exception as exc:
            error = self._call_error(exc, False)
            raise (error.final if isinstance(error, Transient) else error) from None
        finally:
            chunks.close()
        return self.result("".join(text), getattr(last, "prompt_eval_count", 0) or 0,
                           getattr(last, "eval_count", 0) or 0, getattr(last, "done_reason", None),
                           time.perf_counter() - t0)

    def _call_error(self, exc: Exception, probing: bool) -> Exception:
        if isinstance(exc, self._ollama.ResponseError):
            return self._response_error(exc, probing)
        if isinstance(exc, ConnectionError):
            return Transient(BackendUnavailable(self.nothing_answers()), refused=True)
        if isinstance(exc, self._httpx.TimeoutException):
            return Transient(BackendTimeout(f"{self.base_url} did not answer within {self.timeout:.0f} s"))
        if isinstance(exc, self._httpx.TransportError):  # the connection dropped mid-answer
            return Transient(BackendUnavailable(f"{self.base_url}: {type(exc).__name__}: {exc}"))
        return exc

    def _options(self, params: GenerationParams) -> tuple[dict[str, Any], Any]:
        options: dict[str, Any] = {
            "num_predict": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            options["stop"] = list(params.stop)
        if params.seed is not None:
            options["seed"] = params.seed
        fmt: Any = None
        if params.json_object:
            fmt = "json"
        elif params.json_schema is not None:
            fmt = params.json_schema
        return options, fmt

    def _response_error(self, exc: Any, probing: bool) -> Exception:
        status, detail = exc.status_code, (str(exc.error).strip().splitlines() or [""])[0][:200]
        if status == 404 and "not found" in detail.lower():
            return BackendError(
                f"model '{self.served}' is not pulled on {self.base_url}: run `ollama pull {self.served}`"
            )
        return self.transient_or_unsupported(status, detail, probing) or BackendError(f"{self.base_url} rejected the request ({status}): {detail}")

    def list_models(self) -> list[str]:
        try:
            return [m.model for m in self.client.list().models]
        except self._ollama.ResponseError as exc:
            raise self._response_error(exc, False) from None
        except (ConnectionError, self._httpx.TransportError):
            raise BackendUnavailable(self.nothing_answers()) from None

    def close(self) -> None:
        self.client.close()
