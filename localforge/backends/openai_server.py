"""Any OpenAI-compatible server (LM Studio, llama.cpp server, vLLM server, hosted APIs) through
the official ``openai`` client. ``lmstudio`` and ``vllm-server`` are presets of the same class.

The API key comes from an environment variable (``--api-key-env``, default ``OPENAI_API_KEY``),
never from a config file, and is never printed. Local servers need none.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator
from typing import Any

from localforge.backends.resilience import Transient
from localforge.backends.server import ServerBackend
from localforge.backends.spec import EngineSpec
from localforge.backends.structured import PROBES
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
    Timer,
    Unsupported,
)

SPECS = tuple(
    EngineSpec(name=name, label=label, extra="", runs_on=runs_on, generate=f"localforge.backends.openai_server:{cls}",
               requires=("openai",), devices=(), formats=("served",), server=True)
    for name, label, cls, runs_on in [
        ("openai", "OpenAI-compatible server", "OpenAIBackend", "any OpenAI-compatible server ($OPENAI_BASE_URL)"),
        ("lmstudio", "LM Studio", "LMStudioBackend", "LM Studio server (http://localhost:1234/v1)"),
        ("vllm-server", "vLLM server", "VLLMServerBackend", "vLLM server (http://localhost:8000/v1)"),
    ]
)

_PROBE_WORD = "zebra42"
_GRAMMAR_PROBE = threading.Lock()

_START = (
    "start the server (LM Studio: Developer > Start Server; llama.cpp: "
    "python -m llama_cpp.server --model FILE.gguf; vLLM: vllm serve MODEL) or pass --base-url"
)


class OpenAIBackend(ServerBackend):
    name = "openai"
    default_url = "https://api.openai.com/v1"
    url_env = "OPENAI_BASE_URL"
    start_hint = _START
    # grammar: llama.cpp's servers take a GBNF "grammar" field; whether this one does is probed once
    capabilities = Capabilities(batching=True, json_schema=True, json_mode=True, grammar=True)

    def __init__(self, model: str, api_key_env: str = "OPENAI_API_KEY", **options: Any):
        super().__init__(model, **options)
        import openai

        self._openai = openai
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env) or "not-needed"  # local servers ignore it
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=self.timeout)

    def _request(self, conv: Conversation, params: GenerationParams, timeout: float, probing: bool) -> ChatResult:
        kwargs = self._kwargs(conv, params, timeout)
        try:
            with Timer() as t:
                out = self.client.with_options(timeout=timeout).chat.completions.create(**kwargs)
        except Exception as exc:
            raise self._call_error(exc, probing) from None
        try:
            choice = out.choices[0]
            usage = out.usage
            return self.result(choice.message.content or "", usage.prompt_tokens if usage else 0,
                               usage.completion_tokens if usage else 0, choice.finish_reason, t.seconds)
        except (AttributeError, IndexError, TypeError) as exc:
            raise InvalidResponse(f"{self.base_url} returned an unexpected completion: {exc}") from None

    def _stream(self, conv: Conversation, params: GenerationParams) -> Generator[str, None, ChatResult]:
        """``stream=True`` with ``include_usage``: the server's deltas as they come, its finish
        reason and its usage (0 where a server sends none). Opening the stream is retried like
        any call; a connection lost mid-answer is not (the text already sent cannot be unsent)."""
        import time

        if params.grammar is not None or params.json_object or params.json_schema is not None:
            result = self._call(conv, params)  # the modes' probing lives there; one delta
            if result.text:
                yield result.text
            return result
        t0 = time.perf_counter()

        def open_stream(left: float):
            kwargs = self._kwargs(conv, params, left)
            try:
                return self.client.with_options(timeout=left).chat.completions.create(
                    **kwargs, stream=True, stream_options={"include_usage": True})
            except Exception as exc:
                raise self._call_error(exc, False) from None

        chunks = self.endpoint.call(open_stream, self.timeout)
        text: list[str] = []
        finish, usage = None, None
        try:
            for chunk in chunks:
                usage = getattr(chunk, "usage", None) or usage
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                piece = choice.delta.content if choice.delta else None
                if piece:
                    text.append(piece)
                    yield piece
                finish = choice.finish_reason or finish
        except Exception as exc:
            error = self._call_error(exc, False)
            raise (error.final if isinstance(error, Transient) else error) from None
        finally:
            chunks.close()
        return self.result("".join(text), usage.prompt_tokens if usage else 0,
                           usage.completion_tokens if usage else 0, finish, time.perf_counter() - t0)

    def _call_error(self, exc: Exception, probing: bool) -> Exception:
        """An exception from the client as what the rest of localforge reads."""
        if isinstance(exc, self._openai.APIStatusError):
            return self._status_error(exc, probing)
        if isinstance(exc, self._openai.APITimeoutError):
            return Transient(BackendTimeout(f"{self.base_url} did not answer within {self.timeout:.0f} s"))
        if isinstance(exc, self._openai.APIConnectionError):
            return Transient(BackendUnavailable(self.nothing_answers()), refused=True)
        if isinstance(exc, ValueError):  # a body that is not JSON
            return InvalidResponse(f"{self.base_url} returned an unexpected body (not JSON): {exc}")
        return exc

    def _kwargs(self, conv: Conversation, params: GenerationParams, timeout: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            model=self.served,
            messages=conv,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
        )
        if params.stop:
            kwargs["stop"] = list(params.stop)
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.grammar is not None:  # llama.cpp's field; a response_format beside it would replace it
            self._check_grammar(timeout)
            kwargs["extra_body"] = {"grammar": params.grammar}
        elif params.json_object:  # JSON mode; "schema" is llama.cpp's extension, others ignore it
            fmt: dict[str, Any] = {"type": "json_object"}
            if params.json_schema is not None:
                fmt["schema"] = params.json_schema
            # extra_body, because the client drops keys its types do not know (like "schema")
            kwargs["extra_body"] = {"response_format": fmt}
        elif params.json_schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": params.json_schema},
            }
        return kwargs

    def _check_grammar(self, timeout: float) -> None:
        """Ask once per server and model whether it follows a ``grammar`` field: a server that does
        not know the field answers freely (or refuses it), so a one-word grammar tells."""
        if PROBES.accepted(self.identity(), "grammar"):
            return
        with _GRAMMAR_PROBE:
            if PROBES.accepted(self.identity(), "grammar"):
                return
            try:
                out = self.client.with_options(timeout=timeout).chat.completions.create(
                    model=self.served, messages=[{"role": "user", "content": "Say a word."}], max_tokens=8,
                    temperature=0, extra_body={"grammar": f'root ::= "{_PROBE_WORD}"'})
                text = (out.choices[0].message.content or "").strip()
            except self._openai.APIStatusError as exc:
                raise Unsupported(f"{self.base_url} refuses a grammar ({exc.status_code})") from None
            except (self._openai.APIConnectionError, self._openai.APITimeoutError):
                raise Transient(BackendUnavailable(self.nothing_answers()), refused=True) from None
            except (AttributeError, IndexError, TypeError, ValueError):
                text = ""
            if text != _PROBE_WORD:
                raise Unsupported(f"{self.base_url} does not follow a grammar (asked for {_PROBE_WORD!r}, got {text[:40]!r})")
            PROBES.accept(self.identity(), "grammar")

    def _status_error(self, exc: Any, probing: bool) -> Exception:
        status = exc.status_code
        detail = _first_line(exc)
        shared = self.transient_or_unsupported(status, detail, probing)
        if shared is not None:
            return shared
        if status in (401, 403):
            return BackendError(
                f"{self.base_url} refused the API key ({status}): set it in ${self.api_key_env} "
                "(or name another variable with --api-key-env)"
            )
        if status == 404:
            return BackendError(
                f"{self.base_url} does not serve model '{self.served}' ({status}): "
                f"see `localforge models list --backend {self.name} --base-url {self.base_url}`"
            )
        if status == 400 and "context" in detail.lower():
            return RequestTooLarge(f"{self.base_url}: the request does not fit the context window: {detail}")
        return BackendError(f"{self.base_url} rejected the request ({status}): {detail}")

    def list_models(self) -> list[str]:
        try:
            return [m.id for m in self.client.with_options(timeout=min(self.timeout, 10)).models.list()]
        except self._openai.APIStatusError as exc:
            raise self._status_error(exc, False) from None
        except self._openai.APIConnectionError:
            raise BackendUnavailable(self.nothing_answers()) from None

    def close(self) -> None:
        self.client.close()


class LMStudioBackend(OpenAIBackend):
    name = "lmstudio"
    default_url = "http://localhost:1234/v1"
    url_env = "LMSTUDIO_BASE_URL"
    start_hint = "start LM Studio's server (Developer > Start Server, or `lms server start`)"


class VLLMServerBackend(OpenAIBackend):
    name = "vllm-server"
    default_url = "http://localhost:8000/v1"
    url_env = "VLLM_BASE_URL"
    start_hint = "start it with `vllm serve MODEL`"


def _first_line(exc: Any) -> str:
    body = getattr(exc, "body", None)
    msg = body.get("message") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        msg = body["error"].get("message")
    text = str(msg or exc.message or exc)
    return text.strip().splitlines()[0][:200] if text.strip() else f"HTTP {exc.status_code}"
