"""The ollama backend against an Ollama-protocol server on 127.0.0.1.

No Ollama server can be installed on these machines, so ``tests/servers.py`` implements the
documented endpoints the official client uses (/api/chat, /api/generate, /api/tags, /api/show;
streaming NDJSON and not), answered by the real SmolLM2 model through the in-process llama.cpp
backend: the protocol is Ollama's, the answers are real.
"""

from __future__ import annotations

import json

import ollama
import pytest

from localforge.backends import BackendError, generate_json, get_backend, structured_modes
from tests.helpers import MESSAGES, run_cli
from tests.servers import ALIAS

pytestmark = pytest.mark.slow


def test_chat(ollama_url):
    with get_backend("ollama", f"ollama:{ALIAS}", base_url=ollama_url) as be:
        r = be.chat(MESSAGES, max_tokens=24)
    assert "Paris" in r.text and r.finish_reason == "stop"
    assert r.prompt_tokens > 20 and r.completion_tokens > 0


def test_ollama_host_is_honoured(ollama_url, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", ollama_url.removeprefix("http://"))
    with get_backend("ollama", ALIAS) as be:
        assert be.base_url == ollama_url
        assert be.list_models() == [f"{ALIAS}:latest"]
        assert be.health().ok


def test_auto_takes_an_ollama_reference_to_ollama(ollama_url, monkeypatch):
    """``--model ollama:TAG`` (a pipeline's ``teacher: ollama:TAG``) needs no ``--backend ollama``."""
    monkeypatch.setenv("OLLAMA_HOST", ollama_url.removeprefix("http://"))
    with get_backend("auto", f"ollama:{ALIAS}") as be:
        assert be.name == "ollama"
        assert "Paris" in be.chat(MESSAGES, max_tokens=24).text


def test_format_schema_gives_valid_json(ollama_url):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    with get_backend("ollama", ALIAS, base_url=ollama_url) as be:
        assert structured_modes(be)[0] == "schema"
        assert set(generate_json(be, MESSAGES, schema)) == {"city"}


def test_model_not_pulled_says_ollama_pull(ollama_url):
    with get_backend("ollama", "llama3.2:3b", base_url=ollama_url) as be:
        with pytest.raises(BackendError, match=r"model 'llama3.2:3b' is not pulled on .*: run `ollama pull llama3.2:3b`"):
            be.chat(MESSAGES, max_tokens=4)


def test_cli(ollama_url):
    out = run_cli("generate", MESSAGES[0]["content"], "--backend", "ollama", "--model", f"ollama:{ALIAS}",
                  "--base-url", ollama_url, "--max-tokens", "24")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    listed = run_cli("models", "list", "--backend", "ollama", "--base-url", ollama_url, "--json")
    assert json.loads(listed.stdout) == [f"{ALIAS}:latest"]


def test_the_test_server_speaks_the_streaming_protocol(ollama_url):
    """The official client's streaming chat and generate parse what the test server sends."""
    client = ollama.Client(host=ollama_url)
    chunks = list(client.chat(model=ALIAS, messages=MESSAGES, stream=True, options={"temperature": 0}))
    assert chunks[-1].done and "Paris" in "".join(c.message.content for c in chunks)
    gen = client.generate(model=ALIAS, prompt=MESSAGES[0]["content"], options={"temperature": 0})
    assert "Paris" in gen.response
    assert client.show(ALIAS).details.family == "llama"
