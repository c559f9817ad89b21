"""Merging an adapter into its base model through PEFT's ``merge_and_unload``: a plain Hugging
Face folder that every engine loads (tied embeddings stay tied, weights in the base's dtype)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path

from localforge.adapters import (
    WEIGHTS,
    base_error,
    base_ref,
    convert,
    detect,
    misfit,
    read_safetensors,
    resolve_base,
)
from localforge.errors import ConfigError, LocalforgeError, MissingDependency


@contextlib.contextmanager
def quiet_peft():
    """Hide the deprecation warning PEFT triggers in transformers 5 on every load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def fuse(adapter: str | Path, out: str | Path, base: str | None = None) -> Path:
    """Merge ``adapter`` into its base model; write a plain HF folder (config, safetensors
    weights in the base's dtype, tokenizer files) at ``out``. Tied embeddings stay tied."""
    from localforge.backends.hf import NO_HUB_KERNELS, ensure_hf, quiet_transformers

    adapter, out = Path(adapter), Path(out)
    fmt = detect(adapter)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} exists and is not empty: choose a new one")
    ref = base or base_ref(adapter)
    resolved = resolve_base(adapter, ref)
    try:
        base_dir = Path(ensure_hf(resolved))
    except LocalforgeError as exc:
        raise base_error(adapter, ref, exc) from None
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise MissingDependency("fusing an adapter", "torch", exc.name) from None

    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        peft_dir = adapter if fmt == "peft" else convert(adapter, "peft", Path(tmp) / "peft", str(base_dir))
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **NO_HUB_KERNELS)
        tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        names = read_safetensors(peft_dir / WEIGHTS["peft"])[0]
        touched = [n for n in names if tied and re.search(r"(^|\.)(lm_head|embed_tokens)\.", n)]
        if touched:
            raise ConfigError(f"{adapter} changes '{touched[0]}', which the base ties to the other "
                              "embedding matrix: fusing would untie them; load the adapter instead")
        try:
            with quiet_peft():
                merged = PeftModel.from_pretrained(model, str(peft_dir)).merge_and_unload().eval()
        except (RuntimeError, ValueError, KeyError) as exc:
            raise misfit(adapter, str(base_dir), exc) from None
    dtype = _base_dtype(base_dir)
    if dtype != "float32":
        merged = merged.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    skip = re.compile(r".*\.(safetensors|bin|pt|pth|gguf|h5|msgpack)$|.*\.index\.json$|config\.json$")
    for f in base_dir.iterdir():
        if f.is_file() and not skip.fullmatch(f.name) and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return out


def _base_dtype(base_dir: Path) -> str:
    cfg = json.loads((base_dir / "config.json").read_text())
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return dtype if dtype in ("float16", "bfloat16") else "float32"
