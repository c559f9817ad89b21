"""What every server backend shares: an endpoint, a timeout, parallel batches, capability probes.

Subclasses implement ``_request`` (one conversation, one HTTP call, raising ``Transient`` for
failures worth retrying) and ``list_models``. Batches run in parallel, bounded by the endpoint's
concurrency limit; every call goes through the endpoint's retries and circuit breaker.
"""

from __future__ import annotations

import os
import re
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, ClassVar

from localforge.backends.base import Backend
from localforge.backends.resilience import Transient, endpoint
from localforge.backends.structured import PROBES
from localforge.backends.types import (
    BackendUnavailable,
    ChatResult,
    Conversation,
    GenerationParams,
    Health,
    Unsupported,
    first_line,
)
from localforge.errors import ConfigError, UsageError
from localforge.models import resolve

_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?$")


def normalize_url(url: str, where: str = "--base-url") -> str:
    """A server URL as the clients take it: ``http://`` added to a bare ``host:port[/path]``;
    anything else that is not an http(s) URL with a host is a one-line error naming ``where``
    (a ``UsageError`` for a flag, a ``ConfigError`` for an environment variable)."""
    from urllib.parse import urlsplit

    text = url.strip()
    full = text if "://" in text else f"http://{text}"
    why = ""
    try:
        parts = urlsplit(full)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
        host = parts.hostname or ""
    except ValueError as exc:
        parts, host, why = None, "", str(exc)
    if parts is not None:
        if parts.scheme.lower() not in ("http", "https"):
            why = f"it starts with '{full.split('://')[0]}://', not http:// or https://"
        elif not host:
            why = "no host"
        elif any(ch.isspace() for ch in text):
            why = "it contains spaces"
        elif ":" not in host and not all(_LABEL.match(label) for label in host.rstrip(".").split(".")):
            why = f"'{host}' is not a host name"
    if why:
        error = UsageError if where.startswith("--") else ConfigError
        raise error(f"{where} {url!r} is not a server URL ({why}): give http://HOST:PORT/PATH, "
                    "e.g. http://localhost:8080/v1")
    return full.rstrip("/")


class ServerBackend(Backend):
    default_url: ClassVar[str] = ""
    url_env: ClassVar[str | None] = None  # an environment variable that overrides default_url
    start_hint: ClassVar[str] = ""  # how to start such a server, for "nothing answers" errors

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        timeout: float = 120.0,
        concurrency: int = 4,
        **options: Any,
    ):
        super().__init__(model, **options)
        from_env = (self.url_env and os.environ.get(self.url_env)) or None
        given = base_url or from_env
        self.base_url = normalize_url(given, "--base-url" if base_url else f"${self.url_env}") if given \
            else self.default_url.rstrip("/")
        self.timeout = float(timeout)
        # The registry reads server names (``ollama:TAG``, repo ids, served names); an alias or a
        # locally cached repo id is sent as written. "" lists models without naming one.
        self.served = (resolve(model, allow_served=True).served_name or model) if model else ""
        self.endpoint = endpoint(self.base_url, concurrency)
        self.capabilities = replace(type(self).capabilities, parallel=self.endpoint.concurrency)

    @property
    def model_name(self) -> str:
        return self.served

    # --- for subclasses ------------------------------------------------------------------------

    @abstractmethod
    def _request(self, conv: Conversation, params: GenerationParams, timeout: float, probing: bool) -> ChatResult:
        """One request. Raise ``Transient`` for what a retry may fix; when ``probing`` a
        structured-output mode, raise ``Unsupported`` if the server rejects that mode."""

    @abstractmethod
    def list_models(self) -> list[str]:
        """The model names this server offers."""

    # --- shared --------------------------------------------------------------------------------

    def identity(self) -> tuple:
        return (self.name, self.base_url, self.served)

    def _map(self, fn, items: list) -> list:
        """``fn`` over ``items`` in parallel, at most the endpoint's concurrency at once, in order."""
        if len(items) == 1:
            return [fn(items[0])]
        with ThreadPoolExecutor(max_workers=min(len(items), self.endpoint.concurrency)) as pool:
            return list(pool.map(fn, items))

    def generate(self, conversations: list[Conversation], params: GenerationParams) -> list[ChatResult]:
        return self._map(lambda conv: self._call(conv, params), conversations)

    def _call(self, conv: Conversation, params: GenerationParams) -> ChatResult:
        mode = ("grammar" if params.grammar is not None else "json" if params.json_object
                else "schema" if params.json_schema is not None else None)
        probing = mode is not None and not PROBES.accepted(self.identity(), mode)
        try:
            result = self.endpoint.call(lambda left: self._request(conv, params, left, probing), self.timeout)
        except Unsupported as exc:
            if probing and getattr(exc, "ambiguous", False):
                # An error status while trying a mode blames the mode only if the same request
                # without it goes through; else that request's own error is the real one (a
                # prompt too long, a server in trouble), and the mode is not marked rejected.
                plain = replace(params, json_schema=None, json_object=False, grammar=None, max_tokens=1)
                self.endpoint.call(lambda left: self._request(conv, plain, left, False), self.timeout)
            raise
        if probing:
            PROBES.accept(self.identity(), mode)
        return result

    def health(self) -> Health:
        try:
            models = self.list_models()
        except Exception as exc:  # noqa: BLE001 - health reports, it never raises
            return Health(False, first_line(exc))
        return Health(True, f"{self.base_url} answers; {len(models)} model(s)")

    def transient_or_unsupported(self, status: int, detail: str, probing: bool) -> Exception | None:
        """The shared reading of an HTTP error status: a rejected structured-output mode while
        probing, a retryable 429/5xx, or None (the caller maps the rest)."""
        if probing and status in (400, 422, 500, 501) and "context" not in detail.lower():
            exc = Unsupported(f"{self.base_url} rejects this output format ({status}): {detail}")
            exc.ambiguous = True  # type: ignore[attr-defined] - _call checks it with a plain request
            return exc
        if status == 429 or status >= 500:
            return Transient(BackendUnavailable(f"{self.base_url} answered {status}: {detail}"))
        return None

    def nothing_answers(self) -> str:
        return f"nothing answers at {self.base_url}: {self.start_hint}, or choose another --backend"


# Local servers `auto` may use, and the cheap GET that tells whether one answers.
LOCAL_SERVERS = (
    ("ollama", "OLLAMA_HOST", "http://localhost:11434", "/api/tags"),
    ("lmstudio", "LMSTUDIO_BASE_URL", "http://localhost:1234/v1", "/models"),
)


def answering_local_servers(timeout: float = 0.3) -> tuple[str, ...]:
    """Names of the local servers that answer right now (connection refused is instant)."""
    import httpx

    found = []
    for name, env, default, path in LOCAL_SERVERS:
        url = (os.environ.get(env) or default).rstrip("/")
        url = url if "://" in url else f"http://{url}"
        try:
            if httpx.get(url + path, timeout=timeout).status_code == 200:
                found.append(name)
        except httpx.HTTPError:
            pass
    return tuple(found)
