"""Fine-tuning fixtures: a tiny random Llama (made here, saved as a HF folder) and small data files.

The tiny model has SmolLM2's real tokenizer and chat template, so data encoding is the real
thing, and few enough weights (about 3.3M) that a training step takes milliseconds on the CPU,
on torch and on MLX alike.
"""

from __future__ import annotations

import json

import pytest

TRAIN_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
    for a in range(1, 9) for b in (2, 5)
] + [{"prompt": f"Capital of country #{i}:", "completion": f" City number {i}."} for i in range(8)] + [
    {"text": f"Line {i}: the quick brown fox jumps over the lazy dog."} for i in range(8)]
VALID_ROWS = [
    {"messages": [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "3 plus 4 is 7."}]},
    {"prompt": "Capital of country #9:", "completion": " City number 9."},
    {"text": "Line 9: the quick brown fox jumps over the lazy dog."},
]


def make_tiny_llama(path, smol_hf: str, seed: int = 0) -> str:
    """A random 2-layer Llama with SmolLM2's tokenizer, saved as a HF folder at ``path``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smol_hf)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smol) -> str:
    from localforge.models import ensure_hf

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), ensure_hf(smol))


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def train_data(tmp_path):
    """A data folder with train.jsonl (chat, prompt/completion and text rows) and valid.jsonl."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", TRAIN_ROWS)
    write_jsonl(folder / "valid.jsonl", VALID_ROWS)
    return folder
