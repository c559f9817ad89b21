"""Helpers shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = "smollm2-135m"

# Real documents from the docling project, used in place from shared/ beside the checkout (as CI
# and every session here have it; it is not part of the repository).
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "docling"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"the shared corpus is not at {CORPUS}")
# The question. On llama.cpp (Q4_1 weights, 8-bit activations) its greedy first token is a
# near-tie ("The" 0.152 vs "L" 0.140 in fp32) that flips to "L'Étoile..."; asking for one sentence
# gives every backend a clear answer.
QUESTION = "What is the capital of France?"
ONE_SENTENCE = "What is the capital of France? Answer in one sentence."
MESSAGES = [{"role": "user", "content": ONE_SENTENCE}]


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `localforge ARGS` in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "localforge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def crash_then_resume(cmd: list[str], out: Path, progress: Path, env: dict, cut: str, fresh: Path,
                      timeout: float = 300):
    """Run ``cmd -o out``, kill -9 it once its progress file has a finished line, leave ``cut`` (a
    half-written line) at the end of ``out``, then run it again on ``out`` (the resume) and on
    ``fresh`` (an uninterrupted run). Returns (lines finished at the kill, resumed, fresh)."""
    import signal
    import time

    proc = subprocess.Popen([*cmd, "-o", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (progress.is_file() and progress.read_text().count("\n") >= 1):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = progress.read_text().count("\n") if progress.is_file() else 0
    with open(out, "a") as fh:
        fh.write(cut)  # what a kill in the middle of a write leaves
    resumed = subprocess.run([*cmd, "-o", str(out)], env=env, capture_output=True, text=True, timeout=600)
    again = subprocess.run([*cmd, "-o", str(fresh)], env=env, capture_output=True, text=True, timeout=600)
    return finished, resumed, again


def cli_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``localforge ARGS`` in this process, through ``cli.main`` as the console script runs it (the
    bad-input sweeps use this: no process start per case): (exit code, stdout, stderr)."""
    import pytest

    from localforge.cli import main

    monkeypatch.setattr(sys, "argv", ["localforge", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr()
    return int(exited.value.code or 0), out.out, out.err


def assert_one_line(code: int, err: str, want_code: int, *named: str) -> None:
    """The contract for bad input: the exit code, one line on stderr that starts with "error: ",
    no traceback, no "unexpected", and every ``named`` thing in that line."""
    lines = err.strip().splitlines()
    assert code == want_code, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "unexpected" not in err, err
    for name in named:
        assert name in lines[0], (name, err)


# Training rows in every format (chat, prompt/completion, text), for the fine-tuning tests.
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


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_offline_llama(path, hidden: int = 64, layers: int = 2, seed: int = 0) -> str:
    """A random Llama with a byte-level BPE tokenizer trained here on a few sentences and a ChatML
    template, saved as a HF folder: no bundled model, no hub (for the device machine, which has
    neither). Real shapes come from ``hidden``/``layers``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [f"What is {a} + {b}? {a} + {b} = {a + b}. #### {a + b}" for a in range(30) for b in range(30)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=512, special_tokens=special,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def through_both_attentions(trainer, batch, count: str, monkeypatch):
    """One packed micro-batch's summed loss and adapter gradients through the torch trainer's own
    attention for packed rows, then through transformers' SDPA with the block-diagonal mask it
    builds, as ((loss, grads), (loss, grads), calls): ``calls`` lists, per call of
    ``localforge.backends.torch.attention.<count>`` in the first pass, its sequence count."""
    from localforge.backends.torch import attention

    assert trainer.packed_attention and trainer.model.config._attn_implementation == attention.NAME
    calls = []
    real = getattr(attention, count)

    def counted(query, key, value, cu, *rest):
        calls.append(len(cu) - 1)
        return real(query, key, value, cu, *rest)

    monkeypatch.setattr(attention, count, counted)

    def once():
        trainer.model.zero_grad()
        loss = trainer._loss_sum(trainer.loss, batch)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in trainer.params]

    ours = once()
    seen = list(calls)
    trainer.model.set_attn_implementation("sdpa")
    theirs = once()
    trainer.model.set_attn_implementation(attention.NAME)
    assert calls == seen  # the masked pass never came through here
    return ours, theirs, seen


def assert_same_loss_and_grads(ours, theirs, tol: float) -> None:
    assert ours[0] == pytest.approx(theirs[0], rel=tol)
    for a, b in zip(ours[1], theirs[1], strict=True):
        assert (a - b).abs().max() <= tol * max(1e-6, float(b.abs().max()))
