"""Shared fixtures. Real parts only: the bundled SmolLM2-135M model, real engines, real files.

The tiny random Llama (made here, saved as a HF folder) has SmolLM2's real tokenizer and chat
template, so data encoding is the real thing, and few enough weights (about 3.3M) that a
training step takes milliseconds on the CPU, on torch and on MLX alike.

The GGUF -> HF conversion is done once and cached on disk (under $LOCALFORGE_CACHE or the user
cache), so later runs and later tests reuse it. Loaded backends are session-scoped.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from tests.helpers import MODEL, TRAIN_ROWS, VALID_ROWS, make_tiny_llama, write_jsonl

# Property tests draw the same examples on every run (CI must not turn red by chance); explore new
# ones locally with HYPOTHESIS_PROFILE=explore, and pin what that finds as a plain test case.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def smol():
    """The bundled model resolved, with its HF folder converted (once, cached on disk)."""
    from localforge.backends import ensure_hf
    from localforge.models import resolve

    model = resolve(MODEL)
    ensure_hf(model)
    return model


@pytest.fixture(scope="session")
def torch_backend(smol):
    from localforge.backends import get_backend

    with get_backend("torch", MODEL) as backend:
        yield backend


@pytest.fixture(scope="session")
def mlx_backend(smol):
    from localforge.backends import get_backend

    with get_backend("mlx", MODEL) as backend:
        yield backend


@pytest.fixture(scope="session")
def llamacpp_backend():
    from localforge.backends import get_backend

    with get_backend("llamacpp", MODEL) as backend:
        yield backend


@pytest.fixture(scope="session")
def llama_server(smol):
    """A real llama.cpp server (python -m llama_cpp.server) on 127.0.0.1, serving the bundled GGUF."""
    from tests.servers import LlamaServer

    server = LlamaServer(smol.gguf_path).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ollama_url(llamacpp_backend):
    """An Ollama-protocol server on 127.0.0.1 answered by the real model (see tests/servers.py)."""
    from tests.servers import ollama_server

    server, url = ollama_server(llamacpp_backend)
    yield url
    server.shutdown()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smol) -> str:
    from localforge.backends import ensure_hf

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), ensure_hf(smol))


@pytest.fixture
def train_data(tmp_path):
    """A data folder with train.jsonl (chat, prompt/completion and text rows) and valid.jsonl."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", TRAIN_ROWS)
    write_jsonl(folder / "valid.jsonl", VALID_ROWS)
    return folder
