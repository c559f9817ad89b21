"""Model shapes for the benchmarks: a random-initialised Hugging Face folder of a known shape,
built on the machine that runs the benchmark, so no weights travel.

A GPU machine without network cannot receive the bundled model, and speed and memory depend
on the shape alone (hidden size, layers, heads, vocabulary, context), not on trained weights.
``build(shape, out_dir, device, dtype)`` writes ``config.json``, the weights (safetensors, in
``dtype``) and a tokenizer into ``out_dir`` and returns it:

- ``shape``: a name in ``SHAPES`` (``smollm2-135m``, ``llama-1b``) or a folder with a
  ``config.json`` (and optionally tokenizer files), whose architecture is initialised at random;
- the tokenizer: ``tokenizer`` when given (a folder, or ``bpe``/``none`` for the one trained
  here); else the folder's own when ``shape`` is a folder that has one; else the bundled
  SmolLM2's (converted once by localforge) when it is installed; else a byte-level BPE with a
  ChatML template trained here on ``texts`` and padded to the shape's vocabulary, so the
  embedding and the LM head keep the shape's size (and cost).

The folder is reused when ``out_dir`` already holds one built from the same request
(``bench-shape.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

SHAPES: dict[str, dict] = {
    # SmolLM2-135M's own config
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 100000.0,
                     "rms_norm_eps": 1e-5},
    # a Llama-3.2-1B-like body on SmolLM2's vocabulary: 1.07B parameters
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 49152,
                 "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 100000.0,
                 "rms_norm_eps": 1e-5},
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BPE_NAMES = ("bpe", "none")  # --tokenizer values that ask for the BPE trained here
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2
# ChatML: each message framed by <|im_start|>ROLE\n ... <|im_end|>\n
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DEFAULT_TEXTS = ("The quick brown fox jumps over the lazy dog.", "Write notes about the harbour.",
                 "Pack my box with five dozen liquor jugs.", "0 1 2 3 4 5 6 7 8 9 + - = ? ! , . : ;")


def is_shape(value: str | None) -> bool:
    return bool(value) and (value in SHAPES or (Path(value).expanduser() / "config.json").is_file())


def _config(shape: str):
    """The transformers config of ``shape``: a named one, or a folder's config.json."""
    from transformers import AutoConfig, LlamaConfig

    if shape in SHAPES:
        return LlamaConfig(**SHAPES[shape])
    folder = Path(shape).expanduser()
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--shape {shape}: expected one of {', '.join(SHAPES)} or a folder with a config.json")
    return AutoConfig.from_pretrained(folder)


def bundled_tokenizer() -> str | None:
    """The converted bundled SmolLM2 folder, or None where it is not installed (a GPU machine)."""
    try:
        from localforge.backends import ensure_hf
        from localforge.models import resolve

        return ensure_hf(resolve("smollm2-135m"))
    except Exception:  # not installed, not convertible here: the caller falls back to the BPE
        return None


def byte_bpe(texts, vocab_size: int):
    """A byte-level BPE (any text encodes) trained on ``texts`` with ChatML's special tokens and
    template; its vocabulary is padded with tokens no merge produces up to ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 8192), special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    base.train_from_iterator(list(texts) or list(DEFAULT_TEXTS), trainer)
    data = json.loads(base.to_str())
    vocab = data["model"]["vocab"]
    if len(vocab) > vocab_size:
        raise SystemExit(f"the benchmark's BPE needs {len(vocab)} tokens, more than the shape's vocab_size {vocab_size}")
    filler = 0
    while len(vocab) < vocab_size:  # unreachable by any merge: never produced, only there to size the vocab
        name = f"<|filler_{filler}|>"
        filler += 1
        if name not in vocab:
            vocab[name] = len(vocab)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def _tokenizer(shape: str, tokenizer: str | None, texts, vocab_size: int):
    """(tokenizer, where it came from)."""
    from transformers import AutoTokenizer

    if tokenizer and tokenizer.lower() not in BPE_NAMES:
        return AutoTokenizer.from_pretrained(tokenizer), str(tokenizer)
    if not tokenizer:
        folder = Path(shape).expanduser()
        if shape not in SHAPES and any((folder / f).is_file() for f in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(folder), str(folder)
        bundled = bundled_tokenizer()
        if bundled:
            return AutoTokenizer.from_pretrained(bundled), f"bundled smollm2-135m ({bundled})"
    return byte_bpe(texts, vocab_size), f"byte-level BPE trained here, padded to {vocab_size}"


def build(shape: str, out_dir: str | Path, device: str = "cpu", dtype: str = "fp32", tokenizer: str | None = None,
          texts=(), seed: int = 0) -> str:
    """A random-initialised HF folder of ``shape`` in ``out_dir`` (weights in ``dtype``, initialised
    on ``device``), with a tokenizer (see the module's docstring); returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from localforge.backends.hf import quiet_transformers

    quiet_transformers()
    out = Path(out_dir)
    request = {"shape": shape if shape in SHAPES else str(Path(shape).expanduser().resolve()), "dtype": dtype,
               "tokenizer": tokenizer, "seed": seed}
    stamp = out / "bench-shape.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("request") == request:
        return str(out)
    if dtype not in DTYPES:
        raise SystemExit(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    config = _config(shape)
    tok, source = _tokenizer(shape, tokenizer, texts, config.vocab_size)
    if len(tok) > config.vocab_size:
        raise SystemExit(f"tokenizer {source} has {len(tok)} tokens, more than the shape's vocab_size "
                         f"{config.vocab_size}: pass --tokenizer bpe (or a tokenizer that fits)")
    for key in ("bos", "eos", "pad"):
        value = getattr(tok, f"{key}_token_id")
        if key == "pad" and value is None:
            value = tok.eos_token_id
        if value is not None:
            setattr(config, f"{key}_token_id", value)
    config.use_cache = False
    torch_dtype = getattr(torch, DTYPES[dtype])
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it will train: a 1B model inits in seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    stamp.write_text(json.dumps({"request": request, "tokenizer_source": source, "params": params,
                                 "vocab_size": config.vocab_size, "tokenizer_len": len(tok)}, indent=2))
    return str(out)


def describe(folder: str | Path) -> dict:
    """What ``build`` recorded about a folder it made ({} for any other folder)."""
    stamp = Path(folder) / "bench-shape.json"
    return json.loads(stamp.read_text()) if stamp.is_file() else {}


if __name__ == "__main__":  # python benchmarks/shapes.py SHAPE OUT_DIR [DEVICE] [DTYPE] [TOKENIZER]
    import sys

    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    args = sys.argv[1:]
    print(build(args[0], args[1], *(args[2:4]), tokenizer=args[4] if len(args) > 4 else None))
