"""The OpenAI wire format, as far as a local model serves it: requests read into localforge's own
types (a conversation, ``GenerationParams``, a schema), answers and errors written back in the
shapes OpenAI clients parse.

Fields a client sends that a local model has no use for (``user``, ``logit_bias``,
``presence_penalty``, ...) are accepted and ignored; ones that would change the answer and cannot
be honoured (``n`` > 1, ``tools``, image parts) are a 400 that names the field.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localforge.backends import GenerationParams
from localforge.errors import LocalforgeError


class ApiError(Exception):
    """An answer that is an error: its HTTP status and OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- requests ----------------------------------------------------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # what clients send and a local model ignores


class Part(_Open):
    type: str
    text: str | None = None


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class _Request(_Open):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]


def parse(cls: type[_Request], body: bytes) -> Any:
    """The request body as ``cls``, or a 400 naming the first field that is wrong."""
    try:
        data = json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError too
        raise ApiError(400, f"the request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
        got = "" if err["type"] == "missing" else f" (got {json.dumps(err.get('input'), default=str)[:80]})"
        raise ApiError(400, f"{where or 'body'}: {err['msg']}{got}", param=where or None) from None


_UNION_TAGS = {"str", "list[str]", "list[Part]", "int", "float", "bool", "none", "function-after", "literal",
               "dict[str,any]"}


@dataclass
class Ask:
    """One request in localforge's terms."""

    conversations: list[list[dict[str, str]]]
    params: GenerationParams
    schema: dict[str, Any] | None  # response_format: answer through generate_json
    stream: bool
    include_usage: bool


def chat_ask(req: ChatRequest, default_max_tokens: int, max_tokens_cap: int) -> Ask:
    if req.tools:
        raise ApiError(400, "tools are not supported by localforge serve: leave out tools", param="tools")
    conv = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise ApiError(400, f"messages.{i}.content: only text parts are supported", param=f"messages.{i}.content")
            text = "".join(p.text or "" for p in m.content)
        else:
            text = m.content or ""
        conv.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return Ask([conv], params(req, req.max_completion_tokens or req.max_tokens, default_max_tokens, max_tokens_cap),
               response_schema(req.response_format), req.stream,
               bool(req.stream_options and req.stream_options.include_usage))


def completion_ask(req: CompletionRequest, default_max_tokens: int, max_tokens_cap: int) -> Ask:
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise ApiError(400, "prompt: give a string or a list of strings", param="prompt")
    if req.stream and len(prompts) > 1:
        raise ApiError(400, "prompt: a streamed completion takes one prompt", param="prompt")
    return Ask([[{"role": "user", "content": p}] for p in prompts],
               params(req, req.max_tokens, default_max_tokens, max_tokens_cap), None, req.stream,
               bool(req.stream_options and req.stream_options.include_usage))


def params(req: _Request, max_tokens: int | None, default: int, cap: int) -> GenerationParams:
    if req.n not in (None, 1):
        raise ApiError(400, "n: localforge serve writes one choice per request; send n=1", param="n")
    if max_tokens is not None and max_tokens > cap:
        raise ApiError(400, f"max_tokens: {max_tokens} is above this server's limit of {cap}", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
    try:  # OpenAI's defaults: temperature 1, top_p 1
        return GenerationParams(max_tokens=max_tokens or default, temperature=1.0 if req.temperature is None
                                else req.temperature, top_p=req.top_p or 1.0, stop=tuple(stop), seed=req.seed)
    except LocalforgeError as exc:
        raise ApiError(400, str(exc)) from None


def response_schema(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON Schema a ``response_format`` asks for (``json_object``: any object), or None."""
    if not fmt or fmt.get("type") in (None, "text"):
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ApiError(400, f"response_format.type: {kind!r} is not one of text, json_object, json_schema",
                       param="response_format.type")
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise ApiError(400, "response_format.json_schema.schema: give a JSON Schema object",
                       param="response_format.json_schema.schema")
    from localforge.jsonfiles import check_json_schema

    try:
        return check_json_schema(schema, "response_format.json_schema.schema")
    except LocalforgeError as exc:
        raise ApiError(400, str(exc), param="response_format.json_schema.schema") from None


# --- answers ------------------------------------------------------------------------------------


class Reply:
    """The envelope of one answer: its id, time and model, for the whole body or each chunk."""

    def __init__(self, kind: Literal["chat", "text"], model: str):
        self.kind, self.model = kind, model
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": f"{obj}.chunk" if chunk and self.kind == "chat" else obj,
                "created": self.created, "model": self.model, "system_fingerprint": None}

    def whole(self, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """A complete answer: choices as (text, finish reason)."""
        if self.kind == "chat":
            rows = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                     "logprobs": None} for i, (text, finish) in enumerate(choices)]
        else:
            rows = [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                    for i, (text, finish) in enumerate(choices)]
        return {**self._head(False), "choices": rows, "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
