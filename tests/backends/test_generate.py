"""Real generation with the bundled SmolLM2-135M on every in-process backend."""

from __future__ import annotations

import pytest

from localforge.backends import ChatResult, GenerationParams, Unsupported, get_backend
from tests.helpers import MESSAGES, MODEL, ONE_SENTENCE, QUESTION, run_cli

pytestmark = pytest.mark.slow

BACKENDS = ["torch", "mlx", "llamacpp"]


@pytest.fixture
def backend(request):
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.mark.parametrize("name, prompt", [("torch", QUESTION), ("mlx", QUESTION), ("llamacpp", ONE_SENTENCE)])
def test_cli_answers_paris(name, prompt, smol):
    out = run_cli("generate", prompt, "--backend", name,
                  "--model", MODEL, "--temperature", "0", "--max-tokens", "24")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "Traceback" not in out.stderr and "Loading weights" not in out.stderr


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_result_carries_usage_and_finish_reason(backend):
    r = backend.chat(MESSAGES, max_tokens=24)
    assert isinstance(r, ChatResult)
    assert "Paris" in r.text
    assert r.finish_reason == "stop"
    assert 20 < r.prompt_tokens < 60 and 0 < r.completion_tokens < 24
    assert r.latency_s > 0 and r.backend == backend.name

    cut = backend.chat([{"role": "user", "content": "Count from 1 to 50, comma separated."}], max_tokens=5)
    assert cut.finish_reason == "length" and cut.completion_tokens == 5


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_stop_string_ends_the_answer(backend):
    r = backend.chat(MESSAGES, max_tokens=24, stop=["Paris"])
    assert "Paris" not in r.text and r.finish_reason == "stop"
    assert r.text.startswith("The capital of France is")

    count = backend.chat([{"role": "user", "content": "Count from 1 to 20, comma separated."}],
                         max_tokens=40, stop=["5"])
    assert count.text.startswith("1, 2, 3, 4") and "5" not in count.text
    assert count.completion_tokens < 20  # generation stopped there, not just the text


@pytest.mark.parametrize("backend", ["torch", "mlx"], indirect=True)
def test_batch_matches_one_by_one_under_greedy(backend):
    convs = [
        MESSAGES,
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour of the sky."}],
        [{"role": "user", "content": "What is 2 + 2?"}],
    ]
    params = GenerationParams(max_tokens=12)
    batched = backend.chat(convs, params)
    single = [backend.chat(c, params) for c in convs]
    assert [b.text for b in batched] == [s.text for s in single]  # left padding changes nothing
    assert [b.prompt_tokens for b in batched] == [s.prompt_tokens for s in single]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_seeded_sampling_repeats(backend):
    msg = [{"role": "user", "content": "Invent a name for a cat."}]
    a = backend.chat(msg, temperature=1.0, max_tokens=12, seed=7)
    b = backend.chat(msg, temperature=1.0, max_tokens=12, seed=7)
    assert a.text == b.text


def test_llamacpp_json_schema_mode(llamacpp_backend):
    import json

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = llamacpp_backend.chat(MESSAGES, max_tokens=40, json_schema=schema)
    assert set(json.loads(r.text)) == {"city"}


def test_llamacpp_runs_the_prompt_on_the_threads_it_was_given(monkeypatch):
    """The prompt (n_threads_batch) runs on the threads asked for, not llama-cpp-python's default of
    every core: with OpenMP, a prompt on more threads than the free cores stalls (serve at 0.06x of
    llama_cpp.server on a busy 2-core machine)."""
    monkeypatch.setenv("LOCALFORGE_THREADS", "1")
    with get_backend("llamacpp", MODEL) as be:
        assert (be.llm.n_threads, be.llm.n_threads_batch) == (1, 1)
    with get_backend("llamacpp", MODEL, threads=2) as be:
        assert (be.llm.n_threads, be.llm.n_threads_batch) == (2, 2)


def test_llamacpp_refuses_a_model_without_gguf(smol):
    with pytest.raises(Unsupported, match="loads .gguf files"):
        get_backend("llamacpp", smol.hf_path)


@pytest.mark.cuda
def test_torch_on_cuda_picks_bf16(tmp_path):
    """A random model with its own tokenizer (the bundled one does not travel to the GPU machine):
    half precision, and tokens back (a random model knows nothing, so not what they say)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    from tests.helpers import make_offline_llama

    model = make_offline_llama(tmp_path / "m", hidden=128, layers=2)
    with get_backend("torch", model, device="cuda") as be:
        assert be.dtype in (torch.bfloat16, torch.float16)
        result = be.chat(MESSAGES, max_tokens=8)
    assert isinstance(result.text, str) and 0 < result.completion_tokens <= 8
