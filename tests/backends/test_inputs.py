"""Generation input checks: server URLs that are not URLs, prompts longer than the model's
context, GGUF files llama.cpp cannot load. Each is one line, before any work."""

from __future__ import annotations

import os
import shutil

import pytest

from localforge.backends import RequestTooLarge, get_backend
from localforge.backends.server import normalize_url
from localforge.errors import ConfigError, CorruptFile, UsageError
from tests.helpers import assert_one_line
from tests.helpers import cli_main as cli
from tests.servers import ALIAS

SERVERS = ["openai", "lmstudio", "vllm-server", "ollama"]
BAD_URLS = ["ht!tp://x", "ftp://localhost:8080", "http://", ":8080", "http://local host:8080",
            "http://localhost:99999/v1", "http://localhost:port/v1", "http://ex!ample.com/v1"]


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize("backend", SERVERS)
def test_a_base_url_that_is_not_a_url_is_a_usage_error(monkeypatch, capsys, backend, url):
    code, _, err = cli(monkeypatch, capsys, "generate", "hi", "--backend", backend, "--model", ALIAS,
                       "--base-url", url)
    assert_one_line(code, err, 2, "--base-url", url)
    assert "nothing answers" not in err


@pytest.mark.parametrize("backend", SERVERS)
def test_models_list_checks_the_base_url_too(monkeypatch, capsys, backend):
    code, _, err = cli(monkeypatch, capsys, "models", "list", "--backend", backend, "--base-url", "ht!tp://x")
    assert_one_line(code, err, 2, "--base-url", "ht!tp://x")


@pytest.mark.parametrize("url, want", [
    ("localhost:8080", "http://localhost:8080"),
    ("127.0.0.1:8080/v1/", "http://127.0.0.1:8080/v1"),
    ("https://api.example.com/v1", "https://api.example.com/v1"),
    ("http://[::1]:8080/v1", "http://[::1]:8080/v1"),
])
def test_a_bare_host_and_port_gets_http(url, want):
    assert normalize_url(url) == want


@pytest.mark.parametrize("backend", SERVERS)
def test_the_backend_uses_the_normalized_url(backend):
    be = get_backend(backend, ALIAS, base_url="127.0.0.1:9/v1")
    assert be.base_url == "http://127.0.0.1:9/v1"
    be.close()


@pytest.mark.parametrize("backend, env", [("openai", "OPENAI_BASE_URL"), ("lmstudio", "LMSTUDIO_BASE_URL"),
                                          ("vllm-server", "VLLM_BASE_URL"), ("ollama", "OLLAMA_HOST")])
def test_a_bad_url_in_the_environment_names_the_variable(monkeypatch, backend, env):
    monkeypatch.setenv(env, "ht!tp://x")
    with pytest.raises(ConfigError) as info:
        get_backend(backend, ALIAS)
    assert not isinstance(info.value, UsageError)
    assert f"${env} 'ht!tp://x' is not a server URL" in str(info.value)


# --- a prompt longer than the context -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_torch(tiny_llama):
    with get_backend("torch", tiny_llama, device="cpu") as be:
        yield be


def long_conversation(tokens: int) -> list[dict]:
    return [{"role": "user", "content": "apple " * tokens}]


@pytest.mark.parametrize("words", [600, 2000])
def test_torch_refuses_a_prompt_longer_than_the_context_before_generating(tiny_torch, words):
    with pytest.raises(RequestTooLarge) as info:
        tiny_torch.chat(long_conversation(words), max_tokens=4)
    msg = str(info.value)
    n = int(msg.split(" is ")[1].split(" tokens")[0])
    assert n > words and "a context of 512 tokens" in msg and len(msg.splitlines()) == 1
    assert isinstance(info.value, ConfigError)


def test_torch_names_the_conversation_in_a_batch(tiny_torch):
    with pytest.raises(RequestTooLarge, match="conversation 1's prompt is"):
        tiny_torch.chat([[{"role": "user", "content": "Hi"}], long_conversation(700)], max_tokens=4)


def test_torch_caps_max_tokens_at_what_the_context_leaves(tiny_torch):
    r = tiny_torch.chat(long_conversation(480), max_tokens=200, temperature=0.0)
    assert r.prompt_tokens < 512 and r.prompt_tokens + r.completion_tokens <= 512


def test_generate_command_refuses_an_overlong_prompt_in_one_line(monkeypatch, capsys, tiny_llama):
    code, out, err = cli(monkeypatch, capsys, "generate", "apple " * 700, "--backend", "torch",
                         "--model", tiny_llama, "--max-tokens", "4")
    assert_one_line(code, err, 1, "tokens", "context of 512")
    assert out == ""


def test_mlx_refuses_a_prompt_longer_than_the_context(tiny_llama):
    pytest.importorskip("mlx_lm")
    with get_backend("mlx", tiny_llama) as be:
        with pytest.raises(RequestTooLarge, match="a context of 512 tokens"):
            be.chat(long_conversation(600), max_tokens=4)
        r = be.chat(long_conversation(480), max_tokens=200)
        assert r.prompt_tokens + r.completion_tokens <= 512


# --- GGUF files llama.cpp cannot load -----------------------------------------------------------


def _corrupt(kind: str, src: str, dest) -> str:
    path = dest / f"{kind}.gguf"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(64 * 1024))
    elif kind == "truncated":
        with open(src, "rb") as f:
            path.write_bytes(f.read(1_000_000))
    elif kind == "unknown-architecture":  # a sound GGUF whose architecture llama.cpp does not know
        shutil.copy(src, path)
        data = bytearray(path.read_bytes()[:4096])
        at = data.find(b"general.architecture") + len(b"general.architecture") + 4 + 8
        assert data[at:at + 5] == b"llama"
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(b"zzzzz")
    return str(path)


KINDS = ["empty", "random", "truncated", "unknown-architecture"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupt_gguf_is_one_line_naming_it(smol, tmp_path, kind):
    path = _corrupt(kind, smol.gguf_path, tmp_path)
    with pytest.raises(CorruptFile) as info:
        get_backend("llamacpp", path)
    msg = str(info.value)
    assert msg.startswith(f"corrupt or unreadable: {path}") and len(msg.splitlines()) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_a_corrupt_gguf_is_one_line(monkeypatch, capsys, smol, tmp_path, kind):
    path = _corrupt(kind, smol.gguf_path, tmp_path)
    code, _, err = cli(monkeypatch, capsys, "generate", "hi", "--backend", "llamacpp", "--model", path)
    assert_one_line(code, err, 1, f"corrupt or unreadable: {path}")


def test_a_bad_url_from_a_config_key_is_a_config_error_naming_it():
    from localforge.backends import check_server_options

    with pytest.raises(ConfigError) as info:
        check_server_options("openai", "ht!tp://x", "base_url in extract.yaml")
    assert not isinstance(info.value, UsageError)
    assert str(info.value).startswith("base_url in extract.yaml 'ht!tp://x' is not a server URL")
