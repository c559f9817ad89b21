"""`localforge serve`: an OpenAI-compatible HTTP API over a localforge backend (FastAPI + uvicorn)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from localforge.commands import common

SERVE_PANEL = "Serving"


def serve(
    backend: common.Backend = None,
    model: common.Model = None,
    adapter: Annotated[Path | None, typer.Option(
        "--adapter", help="A LoRA adapter folder (mlx-lm or PEFT) to load on the model.")] = None,
    base_url: common.BaseUrl = None,
    timeout: common.Timeout = None,
    concurrency: common.Concurrency = None,
    host: Annotated[str, typer.Option(
        "--host", rich_help_panel=SERVE_PANEL,
        help="Address to listen on: loopback by default; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, rich_help_panel=SERVE_PANEL)] = 8000,
    api_key_env: Annotated[str | None, typer.Option(
        "--api-key-env", rich_help_panel=SERVE_PANEL,
        help="Environment variable holding the bearer token clients must send (default: no token).")] = None,
    parallel: Annotated[int | None, typer.Option(
        "--parallel", min=1, rich_help_panel=SERVE_PANEL,
        help="Requests run at once (default: what the backend runs at once; 1 for an in-process engine).")] = None,
    queue: Annotated[int, typer.Option(
        "--queue", min=0, rich_help_panel=SERVE_PANEL,
        help="Requests that may wait beyond those; more get 429 with Retry-After.")] = 16,
    max_request_bytes: Annotated[int, typer.Option(
        "--max-request-bytes", min=1024, rich_help_panel=SERVE_PANEL, help="Larger request bodies get 413.")] = 1_000_000,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", min=1, rich_help_panel=SERVE_PANEL,
        help="The most tokens a request may ask for (more: 400).")] = 4096,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from localforge.errors import UsageError
    from localforge.models import DEFAULT_MODEL

    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env, "")
        if not api_key.strip():
            raise UsageError(f"--api-key-env {api_key_env}: ${api_key_env} is not set or empty: "
                             "export the token clients must send in it, or leave out --api-key-env")
    sock = listen(host, port)  # before the model loads: a port in use fails at once
    backend, model = backend or "auto", model or DEFAULT_MODEL
    try:
        with common.console(stderr=True).status(f"loading {model} ({backend}) ...", spinner="dots"):
            from localforge.backends import get_backend

            be = get_backend(backend, model, base_url=base_url, timeout=timeout, concurrency=concurrency,
                             **({"adapter": str(adapter)} if adapter else {}))
    except BaseException:
        sock.close()
        raise
    common.engine_note(backend)
    with be:
        run(be, sock, model, host, port, api_key, api_key_env, parallel, queue, max_request_bytes, max_tokens,
            adapter)


def run(be, sock: socket.socket, model: str, host: str, port: int, api_key: str | None, api_key_env: str | None,
        parallel: int | None, queue: int, max_request_bytes: int, max_tokens: int, adapter: Path | None) -> None:
    import uvicorn

    from localforge.serve.app import Limits, create_app

    limits = Limits(parallel=parallel or max(1, be.capabilities.parallel), queue=queue,
                    max_request_bytes=max_request_bytes, max_tokens=max_tokens,
                    default_max_tokens=min(512, max_tokens))
    app = create_app(be, model, api_key=api_key, limits=limits, adapter=adapter.name if adapter else None)
    shown = f"[{host}]" if ":" in host else host
    token = f", token from ${api_key_env}" if api_key_env else ""
    sys.stderr.write(f"serving {model} ({be.name}) at http://{shown}:{port}/v1 "
                     f"({limits.parallel} at once, {limits.queue} waiting{token}); Ctrl-C stops\n")
    if not api_key and not is_loopback(host):
        sys.stderr.write(f"warning: --host {host} is reachable from the network and no --api-key-env is set: "
                         "anyone who can reach it can use the model\n")
    sys.stderr.flush()
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or a one-line error naming the flag."""
    from localforge.errors import UsageError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--host {host!r} is not an address or host name this machine knows ({exc}): "
                         "give an IP address such as 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"--port {port}: the address {host}:{port} is already in use: "
                             "stop what listens there, or choose another --port") from None
        if exc.errno == errno.EACCES:
            raise UsageError(f"--port {port}: permission denied on {host}:{port}: choose a --port above 1023") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"--host {host}: not an address of this machine: use 127.0.0.1, 0.0.0.0 "
                             "or one of its own addresses") from None
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock
