"""The converted HF folder behaves the same on torch and MLX.

Greedy decoding of several prompts gives the same first 16 tokens, and the last-position logits
agree within 1e-3. The second test shows this check catches the RoPE trap: mlx-lm reading a
config without a top-level ``rope_theta`` gives different logits.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]
TOKENS = 16


def _conv(prompt):
    return [{"role": "user", "content": prompt}]


def _torch_logits(be, ids):
    import torch

    with torch.inference_mode():
        return be.model(torch.tensor([ids])).logits[0, -1].float().numpy()


def _mlx_logits(model, ids):
    import mlx.core as mx

    out = model(mx.array([ids]))[0, -1].astype(mx.float32)
    return np.array(out)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_and_logits_agree(prompt, torch_backend, mlx_backend):
    ids = mlx_backend.prompt_ids(_conv(prompt))
    assert ids == torch_backend.tokenizer(torch_backend.prompt_text(_conv(prompt)), add_special_tokens=False)["input_ids"]

    t = torch_backend.chat(_conv(prompt), max_tokens=TOKENS)
    m = mlx_backend.chat(_conv(prompt), max_tokens=TOKENS)
    t_ids = torch_backend.tokenizer(t.text, add_special_tokens=False)["input_ids"]
    m_ids = torch_backend.tokenizer(m.text, add_special_tokens=False)["input_ids"]
    assert t_ids[:TOKENS] == m_ids[:TOKENS], (t.text, m.text)

    diff = np.abs(_torch_logits(torch_backend, ids) - _mlx_logits(mlx_backend.model, ids)).max()
    assert diff < 1e-3, diff


def test_parity_check_catches_a_missing_rope_theta(smol, mlx_backend, torch_backend, tmp_path):
    """A folder as transformers 5 saves it: raw mlx-lm gets it wrong, our MLX backend does not."""
    import mlx_lm

    from localforge.backends import get_backend

    broken = tmp_path / "no-rope-theta"
    shutil.copytree(smol.hf_path, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    (broken / "model.safetensors").symlink_to(f"{smol.hf_path}/model.safetensors")
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["rope_theta"]
    (broken / "config.json").write_text(json.dumps(cfg))

    model, _ = mlx_lm.load(str(broken))
    ids = mlx_backend.prompt_ids(_conv(PROMPTS[1]))
    reference = _torch_logits(torch_backend, ids)
    assert np.abs(reference - _mlx_logits(model, ids)).max() > 1e-1  # raw mlx-lm: RoPE base 10000
    with get_backend("mlx", str(broken)) as ours:
        assert np.abs(reference - _mlx_logits(ours.model, ids)).max() < 1e-3
