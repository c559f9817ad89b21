"""vLLM's offline engine: batched generation and guided JSON. Needs vLLM and an NVIDIA GPU;
skipped cleanly elsewhere (these machines have neither)."""

from __future__ import annotations

from importlib.util import find_spec

import pytest

from localforge.backends import generate_json, structured_modes
from tests.helpers import MESSAGES, MODEL

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


@pytest.fixture(scope="module")
def vllm_backend(request):
    if find_spec("vllm") is None:
        pytest.skip("vllm is not installed (CUDA hosts: pip install 'localforge[vllm]')")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    request.getfixturevalue("smol")  # the bundled model, asked for only once vLLM can run it
    from localforge.backends import get_backend

    with get_backend("vllm", MODEL, gpu_memory_utilization=0.3, max_model_len=2048) as be:
        yield be


def test_batch_and_usage(vllm_backend):
    convs = [MESSAGES, [{"role": "user", "content": "What is 2 + 2?"}]]
    out = vllm_backend.chat(convs, max_tokens=24)
    assert "Paris" in out[0].text and all(r.completion_tokens > 0 for r in out)


def test_guided_json(vllm_backend):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    assert structured_modes(vllm_backend)[0] == "schema"
    assert set(generate_json(vllm_backend, MESSAGES, schema)) == {"city"}
