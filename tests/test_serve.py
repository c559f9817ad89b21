"""`localforge serve`: the OpenAI-compatible API over the real bundled model (llama.cpp in-process),
served by real uvicorn on 127.0.0.1 and called with the real ``openai`` client, localforge's own
``openai`` backend and raw HTTP: chat, streaming, JSON schemas, the models list, a bounded load
test, malformed and oversized requests, the queue limit, a client that hangs up, a wrong token,
and the command's bad inputs.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers import MODEL, ONE_SENTENCE, assert_one_line, cli_main
from tests.servers import free_port, wait_until_up

pytestmark = pytest.mark.slow

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}
ASK = [{"role": "user", "content": ONE_SENTENCE}]


class Served:
    """An app from ``create_app`` on real uvicorn in a thread, on a free loopback port."""

    def __init__(self, backend, **limits):
        import uvicorn

        from localforge.serve.app import Limits, create_app

        api_key = limits.pop("api_key", None)
        self.app = create_app(backend, MODEL, api_key=api_key, limits=Limits(**limits))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until_up(self.root + "/health", timeout=30)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.root + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(llamacpp_backend):
    server = Served(llamacpp_backend, parallel=1, queue=16)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    import openai

    with openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def health(served) -> dict:
    return httpx.get(served.root + "/health", timeout=5).json()


# --- the openai client ----------------------------------------------------------------------


def test_chat_matches_the_engine(client, llamacpp_backend):
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24, temperature=0)
    direct = llamacpp_backend.chat(ASK, max_tokens=24)
    assert out.choices[0].message.content == direct.text and "Paris" in direct.text
    assert out.choices[0].finish_reason == direct.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (direct.prompt_tokens, direct.completion_tokens)
    assert out.model == MODEL and out.object == "chat.completion"


def test_streaming_sends_the_same_answer_token_by_token(client, llamacpp_backend):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    direct = llamacpp_backend.chat(ASK, max_tokens=24)
    assert "".join(pieces) == direct.text and len(pieces) > 3  # real deltas, not one blob
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == direct.finish_reason
    assert chunks[-1].usage.completion_tokens == direct.completion_tokens
    assert chunks[-1].usage.prompt_tokens == direct.prompt_tokens


def test_json_schema_answers_validate(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=48, temperature=0, response_format=fmt)
    jsonschema.validate(json.loads(out.choices[0].message.content), CITY)
    assert out.usage.completion_tokens > 0
    streamed = list(client.chat.completions.create(model=MODEL, messages=ask, max_tokens=48, temperature=0,
                                                   response_format=fmt, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    jsonschema.validate(json.loads(text), CITY)  # the validated JSON, whole, in one delta


def test_models_list_and_completions(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    out = client.completions.create(model=MODEL, prompt="Name a colour.", max_tokens=6, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens <= 6
    pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt="Name a colour.",
                                                                    max_tokens=6, temperature=0, stream=True)]
    assert "".join(pieces) == out.choices[0].text


def test_localforge_openai_backend_works_against_it(served):
    from localforge.backends import generate_json, get_backend

    with get_backend("openai", MODEL, base_url=served.url, timeout=60) as be:
        assert be.list_models() == [MODEL]
        result = be.chat(ASK, max_tokens=24)
        assert "Paris" in result.text and result.completion_tokens > 0
        stream = be.stream(ASK, max_tokens=24)
        assert "".join(stream) == result.text and stream.result.finish_reason == result.finish_reason
        assert isinstance(generate_json(be, [{"role": "user", "content": "Capital of Italy?"}], CITY,
                                        be_params(48))["city"], str)
        batch = be.chat([ASK, ASK, ASK], max_tokens=8)  # parallel requests queue on the server
        assert len({r.text for r in batch}) == 1


def be_params(max_tokens: int):
    from localforge.backends import GenerationParams

    return GenerationParams(max_tokens=max_tokens)


# --- load -----------------------------------------------------------------------------------


def test_load_200_requests_at_concurrency_8_none_lost(client, served, capsys):
    topics = ["rivers", "bread", "owls", "copper", "tides", "chess", "glass", "bees"]

    def one(i: int) -> tuple[float, int, str]:
        t0 = time.perf_counter()
        out = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"One word about {topics[i % 8]}."}],
            max_tokens=4, temperature=0)
        return time.perf_counter() - t0, out.usage.completion_tokens, out.choices[0].message.content

    before = health(served)["served"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        rows = list(pool.map(one, range(200)))
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in rows)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies)) - 1]
    with capsys.disabled():
        print(f"\nserve load: 200 requests at concurrency 8, max_tokens 4: {200 / wall:.1f} req/s, "
              f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, wall {wall:.1f} s")
    assert len(rows) == 200 and all(n >= 1 and text for _, n, text in rows)
    state = health(served)
    assert state["served"] - before == 200 and state["running"] == state["waiting"] == 0


# --- bad requests ---------------------------------------------------------------------------

BAD = [
    (b"{not json", 400, "not JSON", None),
    (b"[1, 2]", 400, "JSON object", None),
    (json.dumps({"model": MODEL}).encode(), 400, "messages", "messages"),
    (json.dumps({"messages": []}).encode(), 400, "messages", "messages"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}).encode(), 400, "role", "messages.0.role"),
    (json.dumps({"messages": ASK, "max_tokens": 0}).encode(), 400, "max_tokens", "max_tokens"),
    (json.dumps({"messages": ASK, "max_tokens": 10**6}).encode(), 400, "limit", "max_tokens"),
    (json.dumps({"messages": ASK, "temperature": -1}).encode(), 400, "temperature", "temperature"),
    (json.dumps({"messages": ASK, "n": 3}).encode(), 400, "n=1", "n"),
    (json.dumps({"messages": ASK, "tools": [{"type": "function"}]}).encode(), 400, "tools", "tools"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400, "text", None),
    (json.dumps({"messages": ASK, "response_format": {"type": "xml"}}).encode(), 400, "response_format", None),
    (json.dumps({"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "thing"}}}}).encode(), 400, "not a valid JSON Schema", None),
    (json.dumps({"messages": ASK, "model": "gpt-9"}).encode(), 404, "gpt-9", "model"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 4}).encode(), 400,
     "context", None),
]


@pytest.mark.parametrize("body, status, says, param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_malformed_requests_get_a_4xx_in_openai_shape(served, body, status, says, param):
    r = httpx.post(served.url + "/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and says in error["message"], error
    if param:
        assert error["param"] == param


def test_the_openai_client_reads_the_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=ASK, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10**7)
    assert httpx.get(served_root(client) + "/nothing-here").json()["error"]["message"]


def served_root(client) -> str:
    return str(client.base_url).rstrip("/").removesuffix("/v1")


@pytest.fixture(scope="module")
def tight(llamacpp_backend, served):
    """One at once, one waiting, small bodies: for the limits (runs while ``served`` is idle)."""
    server = Served(llamacpp_backend, parallel=1, queue=1, max_request_bytes=4096, max_tokens=600)
    yield server
    server.stop()


def test_oversized_bodies_get_413(tight):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 10_000}]}).encode()
    r = httpx.post(tight.url + "/chat/completions", content=big, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no content-length: counted as it arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 1000
        yield b'"}]}'

    r = httpx.post(tight.url + "/chat/completions", content=chunked(), timeout=10)
    assert r.status_code == 413
    assert httpx.get(tight.root + "/health").json()["status"] == "ok"


def test_beyond_the_queue_gets_429_with_retry_after(tight):
    long = {"messages": [{"role": "user", "content": "Tell a very long story about a dragon."}],
            "max_tokens": 300, "temperature": 0}

    def hold():
        return httpx.post(tight.url + "/chat/completions", json=long, timeout=60).status_code

    with ThreadPoolExecutor(max_workers=2) as pool:
        held = [pool.submit(hold) for _ in range(2)]  # one running, one waiting
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (s := httpx.get(tight.root + "/health").json())["waiting"] < 1:
            time.sleep(0.02)
        assert s["running"] == 1 and s["waiting"] == 1, s
        r = httpx.post(tight.url + "/chat/completions", json={"messages": ASK, "max_tokens": 2}, timeout=10)
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert [f.result() for f in held] == [200, 200]


def test_a_client_hanging_up_mid_stream_stops_the_generation(served):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a very long story about a dragon."}],
            "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and health(served)["running"]:
        time.sleep(0.05)
    assert health(served)["running"] == 0  # 2000 tokens take far longer: it stopped
    out = httpx.post(served.url + "/chat/completions", json={"messages": ASK, "max_tokens": 4}, timeout=30)
    assert out.status_code == 200


# --- the command: a real process, a token ---------------------------------------------------


@pytest.fixture(scope="module")
def command(smol, tmp_path_factory):
    """`localforge serve --api-key-env` as a user runs it."""
    port = free_port()
    env = {**os.environ, "LF_SERVE_TEST_KEY": "s3cret-token"}
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with open(log, "w") as err:
        # SIGINT as a terminal delivers it: a test session started in the background by a shell
        # (`make test &`) ignores SIGINT, and its children would inherit that
        proc = subprocess.Popen([sys.executable, "-m", "localforge", "serve", "--backend", "llamacpp", "--model",
                                 MODEL, "--port", str(port), "--api-key-env", "LF_SERVE_TEST_KEY"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", timeout=60, proc=proc)
        yield f"http://127.0.0.1:{port}/v1", proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=15)


def test_the_command_serves_and_checks_the_token(command):
    import openai

    url, proc, log = command
    for key in ("wrong", "", "s3cret-tokenX"):
        with openai.OpenAI(base_url=url, api_key=key or "x", max_retries=0) as c, \
                pytest.raises(openai.AuthenticationError):
            c.models.list()
    r = httpx.get(url + "/models", timeout=5)  # no header at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=url, api_key="s3cret-token", max_retries=0) as c:
        assert [m.id for m in c.models.list()] == [MODEL]
        out = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
        assert out.choices[0].message.content
    text = Path(log).read_text()
    assert "s3cret-token" not in text and "LF_SERVE_TEST_KEY" in text and "127.0.0.1" in text
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 130
    assert "s3cret-token" not in Path(log).read_text()


def test_the_command_refuses_a_port_in_use(monkeypatch, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, out, err = cli_main(monkeypatch, capsys, "serve", "--port", str(port))
    assert_one_line(code, err, 2, "--port", str(port), "already in use")


BAD_FLAGS = [
    (["--api-key-env", "LF_SURELY_UNSET_VAR"], 2, ("--api-key-env", "LF_SURELY_UNSET_VAR")),
    (["--host", "no such host"], 2, ("--host", "no such host")),
    (["--host", "203.0.113.7"], 2, ("--host", "not an address of this machine")),
    (["--model", "./nothing.gguf"], 1, ("./nothing.gguf", "does not exist")),
    (["--model", "nonsense-model"], 1, ("unknown model", "nonsense-model")),
    (["--adapter", "{adapter}"], 1, ("adapters", "--backend")),
]


@pytest.mark.parametrize("args, code, named", BAD_FLAGS, ids=[" ".join(b[0]) for b in BAD_FLAGS])
def test_the_command_refuses_bad_input_in_one_line(args, code, named, tmp_path, monkeypatch, capsys):
    from localforge.backends import REGISTRY

    monkeypatch.delenv("LF_SURELY_UNSET_VAR", raising=False)
    no_adapters = next(n for n, s in REGISTRY.items() if not s.adapters and not s.server)
    extra = ["--backend", no_adapters] if "{adapter}" in args else []
    args = [a.format(adapter=tmp_path) for a in args]
    got, out, err = cli_main(monkeypatch, capsys, "serve", "--port", str(free_port()), *extra, *args)
    assert_one_line(got, err, code, *named)


def test_help_imports_no_web_stack():
    code = ("import sys\nfrom localforge.cli import app\n"
            "try:\n    app(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'llama_cpp', 'torch') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "--api-key-env" in out.stdout and "--queue" in out.stdout


def test_serve_imports_no_engine_and_spells_none():
    """The rules for jobs (ARCHITECTURE.md) hold for the serve package: engines only through
    localforge.backends, no engine named in code."""
    import ast

    from localforge.backends import REGISTRY
    from tests.test_architecture import ENGINES, PACKAGE, imports

    files = sorted((PACKAGE / "serve").rglob("*.py")) + [PACKAGE / "commands" / "serve.py"]
    assert [f"{f.name}:{n}" for f in files for n, name in imports(f) if name.split(".")[0] in ENGINES] == []
    spelled = [f"{f.name}:{node.lineno}" for f in files for node in ast.walk(ast.parse(f.read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in REGISTRY]
    assert spelled == []
