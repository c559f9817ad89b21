"""The OpenAI-compatible backends against a real llama.cpp server on 127.0.0.1, plus faults."""

from __future__ import annotations

import json
import threading
import time

import pytest

from localforge.backends import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    forget_probes,
    generate_json,
    get_backend,
    structured_modes,
)
from localforge.backends.cache import CallCache
from localforge.backends.resilience import CircuitOpen, Endpoint
from localforge.backends.structured import PROBES, StructuredOutputError
from tests.helpers import MESSAGES, run_cli
from tests.servers import (
    ALIAS,
    LlamaServer,
    broken_json_server,
    flaky_proxy,
    free_port,
    hanging_server,
)

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_chat_and_usage(llama_server):
    with get_backend("openai", ALIAS, base_url=llama_server.url) as be:
        r = be.chat(MESSAGES, max_tokens=24)
    assert "Paris" in r.text and r.finish_reason == "stop"
    assert r.prompt_tokens > 20 and 0 < r.completion_tokens < 24 and r.backend == "openai"


def test_lmstudio_preset_is_the_same_protocol(llama_server):
    with get_backend("lmstudio", ALIAS, base_url=llama_server.url) as be:
        assert be.list_models() == [ALIAS]
        assert be.health().ok


def test_batch_runs_in_parallel_and_keeps_order(llama_server):
    convs = [[{"role": "user", "content": f"What is {i} + {i}? Answer with the number only."}] for i in range(1, 7)]
    with get_backend("openai", ALIAS, base_url=llama_server.url, concurrency=3) as be:
        batch = be.chat(convs, max_tokens=8)
        single = [be.chat(c, max_tokens=8) for c in convs]
    assert [b.text for b in batch] == [s.text for s in single]


def test_without_the_grammar_rung_the_ladder_falls_from_schema_to_json(llama_server):
    """llama.cpp's server rejects response_format json_schema (HTTP 500) and its JSON mode ignores
    integer ranges: with the grammar rung set aside, the ladder falls to json_object+schema, and
    validation catches the range."""
    with get_backend("openai", ALIAS, base_url=llama_server.url) as be:
        forget_probes(be)  # other tests may have probed this server already
        assert structured_modes(be) == ["grammar", "schema", "json", "prompt"]
        PROBES.reject(be.identity(), "grammar")
        try:
            obj = generate_json(be, [{"role": "user", "content": "Invent a person."}], PERSON, attempts=4)
            assert 18 <= obj["age"] <= 99
        except StructuredOutputError as exc:  # a 135M model may never get the range right
            assert all(a.mode == "json" for a in exc.attempts)
            assert any("age" in a.error for a in exc.attempts)
        assert structured_modes(be) == ["json", "prompt"]  # the probe is remembered
        forget_probes(be)


def test_json_schema_cli(llama_server, tmp_path):
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
    out = run_cli("generate", "What is the capital of France?", "--backend", "openai", "--model", ALIAS,
                  "--base-url", llama_server.url, "--json-schema", str(schema), "--max-tokens", "40")
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) == {"city"}


def test_cli_models_list(llama_server):
    out = run_cli("models", "list", "--backend", "openai", "--base-url", llama_server.url, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [ALIAS]


def test_unknown_model_names_the_fix(llama_server):
    """llama-cpp-python's server answers any model name; the 404 path is checked on Ollama."""
    with get_backend("openai", "no-such-model", base_url=llama_server.url) as be:
        assert be.chat(MESSAGES, max_tokens=4).text  # served under the alias regardless


def test_wrong_port_fails_fast_and_clearly():
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    out = run_cli("generate", "hi", "--backend", "openai", "--model", ALIAS, "--base-url", url)
    assert out.returncode == 1
    assert out.stderr.startswith(f"error: nothing answers at {url}: start the server")
    assert time.monotonic() - t0 < 10


def test_500_then_recovers(llama_server):
    server, url, state = flaky_proxy(llama_server.url, failures=2)
    try:
        with get_backend("openai", ALIAS, base_url=url) as be:
            be.endpoint.alive = True  # the proxy answered before in real life; not needed for 500s
            r = be.chat(MESSAGES, max_tokens=12)
        assert "Paris" in r.text
        assert state["seen"] == 3  # two 500s retried, then the answer
    finally:
        server.shutdown()


def test_a_4xx_is_not_retried(llama_server):
    server, url, state = flaky_proxy(llama_server.url, failures=1, status=400)
    try:
        with get_backend("openai", ALIAS, base_url=url) as be:
            with pytest.raises(BackendError, match=r"rejected the request \(400\): injected 400"):
                be.chat(MESSAGES, max_tokens=4)
        assert state["seen"] == 1
    finally:
        server.shutdown()


def test_hanging_server_fails_at_the_timeout():
    server, url, release = hanging_server()
    try:
        with get_backend("openai", ALIAS, base_url=url, timeout=2.0) as be:
            t0 = time.monotonic()
            with pytest.raises(BackendTimeout, match="did not answer within 2 s"):
                be.chat(MESSAGES, max_tokens=4)
            assert 1.5 < time.monotonic() - t0 < 4.0
    finally:
        release.set()
        server.shutdown()


def test_malformed_body_is_a_clean_error():
    server, url = broken_json_server()
    try:
        with get_backend("openai", ALIAS, base_url=url, timeout=5) as be:
            with pytest.raises(BackendError, match="unexpected"):
                be.chat(MESSAGES, max_tokens=4)
    finally:
        server.shutdown()


def test_server_killed_mid_batch_and_restarted(smol, tmp_path):
    """The job finishes, every answer arrives once, in order, and each is cached once."""
    server = LlamaServer(smol.gguf_path).start()
    convs = [[{"role": "user", "content": f"Name a word that rhymes with '{w}'."}]
             for w in ("cat", "dog", "sun", "tree", "blue", "rain", "star", "cake", "bell", "moon")]
    cache = CallCache(tmp_path / "calls.sqlite")
    try:
        with get_backend("openai", ALIAS, base_url=server.url, concurrency=2, timeout=120) as ref:
            expected = [ref.chat(c, max_tokens=12).text for c in convs]

        def kill_and_restart():
            time.sleep(1.0)
            server.stop()
            time.sleep(1.0)
            server.start()

        with get_backend("openai", ALIAS, base_url=server.url, concurrency=2, timeout=120, cache=cache) as be:
            chaos = threading.Thread(target=kill_and_restart)
            chaos.start()
            results = be.chat(convs, max_tokens=12)
            chaos.join()
        assert [r.text for r in results] == expected
        assert len(cache) == len(convs)
    finally:
        server.stop()


def test_circuit_breaker_fails_fast_after_a_dead_server():
    ep = Endpoint("http://dead.test", concurrency=1)
    ep.alive = True  # it answered once, so refusals are retried...
    ep.retry = type(ep.retry)(attempts=2, base_s=0.01, max_s=0.01)
    from localforge.backends.resilience import Transient

    def refuse(_left):
        raise Transient(BackendUnavailable("nothing answers at http://dead.test"), refused=True)

    for _ in range(ep.breaker.threshold):
        with pytest.raises(BackendUnavailable, match="nothing answers"):
            ep.call(refuse, 5)
    t0 = time.monotonic()
    with pytest.raises(CircuitOpen, match="failed 3 calls in a row and is paused"):
        ep.call(refuse, 5)  # ...until the breaker opens: now it fails at once
    assert time.monotonic() - t0 < 0.05
