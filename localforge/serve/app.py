"""The HTTP app: an OpenAI-compatible API over one loaded localforge backend.

``create_app(backend, ...)`` builds a FastAPI app with ``/health``, ``/v1/models``,
``/v1/chat/completions`` and ``/v1/completions`` (each streamed as server-sent events, or not).
It talks to the engine only through the ``Backend`` interface: ``chat`` and ``stream``, and
``generate_json`` for a ``response_format`` (the structured ladder: grammar, schema, JSON mode,
prompt, each answer validated). A streamed JSON answer is sent whole, as one delta, once it validates.

Engines block, so calls run on a pool of ``Limits.parallel`` threads (1 for an in-process engine,
which runs one request at a time; a server backend's own concurrency otherwise), ``Limits.queue``
more wait, and one more gets a 429 with Retry-After. A bad request is a 4xx, a failing engine a
503, both with OpenAI's error body; nothing a client sends or does (hanging up mid-stream
included) stops the server. With ``api_key``, every ``/v1`` request needs ``Authorization:
Bearer KEY`` (compared in constant time; never logged); ``/health`` stays open.

``/v1/completions`` sends the prompt as one user message: the ``Backend`` interface completes
conversations, so the engine's chat template applies.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from localforge.backends import (
    Backend,
    BackendError,
    ChatResult,
    Conversation,
    GenerationParams,
    RequestTooLarge,
    Unsupported,
    generate_json,
)
from localforge.errors import LocalforgeError
from localforge.serve import protocol
from localforge.serve.gate import Gate
from localforge.serve.protocol import ApiError, Ask, ChatRequest, CompletionRequest, Reply

log = logging.getLogger("localforge.serve")


@dataclass(frozen=True)
class Limits:
    parallel: int = 1  # requests that run at once
    queue: int = 16  # requests that may wait beyond those; more get a 429
    max_request_bytes: int = 1_000_000  # a larger body gets a 413
    max_tokens: int = 4096  # a request asking for more gets a 400
    default_max_tokens: int = 512  # a request that names none


def create_app(backend: Backend, model_id: str | None = None, *, api_key: str | None = None,
               limits: Limits | None = None, adapter: str | None = None):
    """The app serving ``backend`` as model ``model_id`` (default: the backend's model reference)."""
    limits = limits or Limits(parallel=max(1, backend.capabilities.parallel))
    model_id = model_id or backend.model_ref
    names = {n for n in (model_id, backend.model_ref, backend.model_name) if n}
    gate = Gate(limits.parallel, limits.queue)
    started = int(time.time())
    token = api_key.encode() if api_key else None

    async def lifespan(app):
        yield
        gate.close()

    app = FastAPI(title="localforge serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.gate = gate

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown paths, wrong methods
        what = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(ApiError(exc.status_code, what).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(ApiError(400, f"{request.url.path}: {exc.errors()[0].get('msg', 'invalid request')}").body(),
                            status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return JSONResponse(as_api_error(exc, backend).body(), status_code=500)

    def authorize(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            raise ApiError(401, "missing or wrong API key: send the server's token as 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        limit = limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        too_large = ApiError(413, f"the request body is larger than this server takes ({limit} bytes)",
                             code="request_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
        return b"".join(parts)

    def check_model(name: str | None) -> None:
        if name and name not in names:
            raise ApiError(404, f"model '{name}' is not served here: this server serves '{model_id}'",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "backend": backend.name, **gate.state()}

    def model_card() -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": started, "owned_by": "localforge",
                "backend": backend.name}
        return {**card, "adapter": adapter} if adapter else card

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = protocol.parse(ChatRequest, await read_body(request))
        check_model(req.model)
        return await answer(protocol.chat_ask(req, limits.default_max_tokens, limits.max_tokens), Reply("chat", model_id))

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = protocol.parse(CompletionRequest, await read_body(request))
        check_model(req.model)
        return await answer(protocol.completion_ask(req, limits.default_max_tokens, limits.max_tokens),
                            Reply("text", model_id))

    async def answer(ask: Ask, reply: Reply):
        if not gate.admit():
            wait = gate.retry_after()
            raise ApiError(429, f"the server is busy ({gate.parallel} running, {gate.queue} waiting): retry in {wait} s",
                           kind="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
        if ask.stream:
            return await stream_answer(ask, reply)
        future = gate.submit(lambda: whole(backend, ask))
        try:
            choices, prompt_tokens, completion_tokens = await asyncio.wrap_future(future)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error answer
            raise as_api_error(exc, backend) from None
        return reply.whole(choices, prompt_tokens, completion_tokens)

    async def stream_answer(ask: Ask, reply: Reply):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        hung_up = threading.Event()

        def put(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (the server stops)
                hung_up.set()

        gate.submit(lambda: streamed(backend, ask, put, hung_up))
        try:
            first = await queue.get()  # an error before the first token is a plain error answer
        except BaseException:
            hung_up.set()
            raise
        if first[0] == "error":
            raise as_api_error(first[1], backend)

        async def events() -> AsyncIterator[bytes]:
            try:
                if reply.kind == "chat":
                    yield protocol.sse(reply.chunk("", first=True))
                item = first
                while True:
                    kind, value = item
                    if kind == "delta":
                        yield protocol.sse(reply.chunk(value))
                    elif kind == "done":
                        yield protocol.sse(reply.chunk(None, value.finish_reason))
                        if ask.include_usage:
                            yield protocol.sse(reply.usage_chunk(value.prompt_tokens, value.completion_tokens))
                        yield protocol.sse("[DONE]")
                        return
                    else:  # the engine failed mid-answer: the status is sent, so an error event
                        yield protocol.sse(as_api_error(value, backend).body())
                        return
                    item = await queue.get()
            finally:
                hung_up.set()  # a client that hung up: the engine stops at its next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# --- the calls, on the pool's threads ------------------------------------------------------------


class _Counting(Backend):
    """``backend`` as ``generate_json`` sees it, adding up the tokens of every ask it makes."""

    def __init__(self, inner: Backend):
        super().__init__(inner.model_ref)
        self.inner, self.name, self.capabilities = inner, inner.name, inner.capabilities
        self.model_name = inner.model_name
        self.prompt_tokens = self.completion_tokens = 0

    def identity(self) -> tuple:
        return self.inner.identity()

    def generate(self, conversations: list[Conversation], params: GenerationParams) -> list[ChatResult]:
        results = self.inner.generate(conversations, params)
        self.prompt_tokens += sum(r.prompt_tokens for r in results)
        self.completion_tokens += sum(r.completion_tokens for r in results)
        return results


def structured(backend: Backend, ask: Ask) -> ChatResult:
    """The JSON a ``response_format`` asks for, through the structured ladder, as one result."""
    counting = _Counting(backend)
    t0 = time.perf_counter()
    value = generate_json(counting, ask.conversations[0], ask.schema, ask.params)
    return backend.result(json.dumps(value, ensure_ascii=False), counting.prompt_tokens, counting.completion_tokens,
                          "stop", time.perf_counter() - t0)


def whole(backend: Backend, ask: Ask) -> tuple[list[tuple[str, str]], int, int]:
    if ask.schema is not None:
        results = [structured(backend, ask)]
    else:
        results = backend.chat(ask.conversations, ask.params)
    return ([(r.text, r.finish_reason) for r in results], sum(r.prompt_tokens for r in results),
            sum(r.completion_tokens for r in results))


def streamed(backend: Backend, ask: Ask, put, hung_up: threading.Event) -> None:
    """Hand each delta to ``put`` as ("delta", text), then ("done", result) or ("error", exc);
    stop early once ``hung_up`` is set."""
    try:
        if ask.schema is not None:
            result = structured(backend, ask)
            put(("delta", result.text))
            put(("done", result))
            return
        with backend.stream(ask.conversations[0], ask.params) as stream:
            for delta in stream:
                if hung_up.is_set():
                    return
                put(("delta", delta))
            put(("done", stream.result))
    except Exception as exc:  # noqa: BLE001 - sent to the client as an error
        put(("error", exc))


def as_api_error(exc: BaseException, backend: Backend) -> ApiError:
    """What a client is told about a failure."""
    from localforge.backends.types import first_line

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestTooLarge):
        return ApiError(400, first_line(exc), code="context_length_exceeded")
    if isinstance(exc, Unsupported):
        return ApiError(400, first_line(exc), code="unsupported")
    if isinstance(exc, BackendError):
        return ApiError(503, f"the {backend.name} backend failed: {first_line(exc)}", kind="server_error",
                        code="backend_error")
    if isinstance(exc, LocalforgeError):
        return ApiError(400, first_line(exc))
    log.error("unexpected %s while answering a request", type(exc).__name__, exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__}: {first_line(exc)}); the server carries on",
                    kind="server_error", code="internal_error")
