"""Servers the tests start on 127.0.0.1: a real llama.cpp server, an Ollama-protocol server
answered by the real model, and small fault-injecting servers. All bind loopback only and stop
with the test session."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ALIAS = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


class LlamaServer:
    """``python -m llama_cpp.server`` serving the bundled GGUF as model ``smollm2-135m``."""

    def __init__(self, gguf: str, port: int | None = None):
        self.gguf, self.port = gguf, port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LlamaServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", self.gguf, "--model_alias", ALIAS,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048", "--verbose", "False"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until_up(self.url + "/models", proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


# --- small HTTP servers written for the tests ---------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(handler: type[BaseHTTPRequestHandler]) -> tuple[_Server, str]:
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _body(self) -> dict:
        n = int(self.headers.get("content-length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def _send(self, status: int, payload, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def flaky_proxy(upstream: str, failures: int, status: int = 500):
    """Forwards to ``upstream`` but answers ``status`` to the first ``failures`` requests."""
    state = {"left": failures, "seen": 0}
    lock = threading.Lock()

    class Handler(_Handler):
        def do_POST(self):
            body = self._body()
            with lock:
                state["seen"] += 1
                fail = state["left"] > 0
                state["left"] -= fail
            if fail:
                return self._send(status, {"error": {"message": f"injected {status}"}})
            path = urlsplit(self.path).path.removeprefix("/v1")
            req = urllib.request.Request(upstream + path, data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                self._send(r.status, r.read())

    server, url = serve(Handler)
    return server, url + "/v1", state


def hanging_server():
    """Accepts requests and never answers (until the test shuts it down)."""
    release = threading.Event()

    class Handler(_Handler):
        def do_POST(self):
            release.wait(60)

        do_GET = do_POST

    server, url = serve(Handler)
    return server, url + "/v1", release


def broken_json_server():
    """Answers 200 with a body that is not JSON."""

    class Handler(_Handler):
        def do_POST(self):
            self._send(200, b'{"id": "x", "choices": [ {"message": ', "application/json")

    server, url = serve(Handler)
    return server, url + "/v1"


# --- an Ollama-protocol server answered by the real model -------------------------------------


def ollama_server(backend, models=(f"{ALIAS}:latest",)):
    """Implements the Ollama HTTP endpoints the ``ollama`` client uses: /api/chat and
    /api/generate (streaming NDJSON and not), /api/tags and /api/show, following Ollama's API
    documentation. No Ollama can be installed on these machines; answers come from the real
    SmolLM2 model through ``backend`` (an in-process localforge backend), so they are real."""
    from localforge.backends import GenerationParams

    def params_from(body: dict) -> GenerationParams:
        o = body.get("options") or {}
        fmt = body.get("format")
        return GenerationParams(
            max_tokens=int(o.get("num_predict", 128)), temperature=float(o.get("temperature", 0.8)),
            top_p=float(o.get("top_p", 0.9)) or 1.0, stop=tuple(o.get("stop") or ()), seed=o.get("seed"),
            json_schema=fmt if isinstance(fmt, dict) else None, json_object=fmt == "json",
        )

    def now() -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())

    lock = threading.Lock()  # one model, one request at a time, as Ollama does per model

    class Handler(_Handler):
        def _model_or_404(self, body: dict) -> str | None:
            name = body.get("model", "")
            full = name if ":" in name else f"{name}:latest"
            if full not in models:
                self._send(404, {"error": f"model '{name}' not found"})
                return None
            return full

        def do_GET(self):
            if self.path == "/api/tags":
                return self._send(200, {"models": [
                    {"name": m, "model": m, "modified_at": now(), "size": 98362432, "digest": "0" * 64,
                     "details": {"format": "gguf", "family": "llama", "parameter_size": "135M",
                                 "quantization_level": "Q4_1"}} for m in models]})
            if self.path in ("/", "/api/version"):
                return self._send(200, {"version": "0.0.0-test"})
            self._send(404, {"error": "not found"})

        def do_POST(self):
            body = self._body()
            if self.path == "/api/show":
                if self._model_or_404(body):
                    self._send(200, {"modelfile": "", "parameters": "", "template": "",
                                     "details": {"format": "gguf", "family": "llama"}, "model_info": {}})
                return
            if self.path not in ("/api/chat", "/api/generate"):
                return self._send(404, {"error": "not found"})
            name = self._model_or_404(body)
            if not name:
                return
            chat = self.path == "/api/chat"
            conv = body["messages"] if chat else [{"role": "user", "content": body.get("prompt", "")}]
            with lock:
                r = backend.chat(conv, params_from(body))
            final = {"model": name, "created_at": now(), "done": True,
                     "done_reason": r.finish_reason, "total_duration": int(r.latency_s * 1e9),
                     "prompt_eval_count": r.prompt_tokens, "eval_count": r.completion_tokens}
            piece = ({"message": {"role": "assistant", "content": r.text}} if chat else {"response": r.text})
            if body.get("stream", True):  # NDJSON: the text, then a closing record
                lines = [{"model": name, "created_at": now(), "done": False, **piece},
                         {**final, **({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})}]
                return self._send(200, b"".join(json.dumps(x).encode() + b"\n" for x in lines),
                                  "application/x-ndjson")
            self._send(200, {**final, **piece})

    return serve(Handler)


def grammar_dropping_proxy(upstream: str):
    """Forwards to ``upstream`` without the ``grammar`` field, as an OpenAI-compatible server that
    does not know it (LM Studio, vLLM) would: answers come back unconstrained."""
    seen: list[dict] = []

    class Handler(_Handler):
        def do_GET(self):
            with urllib.request.urlopen(upstream + urlsplit(self.path).path.removeprefix("/v1"), timeout=30) as r:
                self._send(r.status, r.read())

        def do_POST(self):
            body = self._body()
            seen.append(dict(body))
            body.pop("grammar", None)
            path = urlsplit(self.path).path.removeprefix("/v1")
            req = urllib.request.Request(upstream + path, data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    self._send(r.status, r.read())
            except urllib.error.HTTPError as exc:
                self._send(exc.code, exc.read())

    server, url = serve(Handler)
    return server, url + "/v1", seen
