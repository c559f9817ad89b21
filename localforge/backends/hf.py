"""Hugging Face folders, which the torch, mlx and vllm engines load: a GGUF converted to one
(once, cached; ``models.converted_dir`` says where), the tokenizer, and quiet transformers.

Conversion goes through transformers' GGUF reader (the ``torch`` extra: transformers and gguf);
transformers is imported only when a conversion or a tokenizer load needs it.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

from localforge.errors import MissingDependency, ModelNotFound
from localforge.models import ResolvedModel, converted_dir, is_hf_folder, portable_config


def ensure_hf(model: ResolvedModel) -> str:
    """Return a HF folder for ``model``, converting its GGUF once if needed."""
    if model.hf_path and is_hf_folder(Path(model.hf_path)):
        return model.hf_path
    if not model.gguf_path:
        raise ModelNotFound(f"model '{model.ref}' has neither a HF folder nor a GGUF file to convert")
    model.hf_path = str(convert_gguf(Path(model.gguf_path)))
    return model.hf_path


def convert_gguf(gguf: Path, out: Path | None = None) -> Path:
    """Convert a GGUF file to a HF safetensors folder (fp32, tokenizer, chat template).

    The folder is written next to its final place and renamed into it, so an interrupted
    conversion never leaves a half folder behind. The config is patched so every engine reads
    the same RoPE base (see ``models.portable_config``).
    """
    out = out or converted_dir(gguf)
    if is_hf_folder(out):
        return out
    if find_spec("transformers") is None or find_spec("gguf") is None:
        raise MissingDependency(f"converting {gguf.name} to a HF folder", "torch", "transformers/gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        kwargs = {"gguf_file": gguf.name}
        # transformers' GGUF reader draws its own tqdm bars with no switch; keep them off the
        # terminal (the CLI shows one spinner for the whole load).
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **_gguf_load_kwargs(kwargs),
                                                         **NO_HUB_KERNELS)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        cfg_path = tmp / "config.json"
        cfg_path.write_text(json.dumps(portable_config(json.loads(cfg_path.read_text())), indent=2))
        (tmp / "localforge.json").write_text(json.dumps({"converted_from": str(gguf)}, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not is_hf_folder(out):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# Every model localforge loads through transformers: no kernels from the Hub. transformers 5
# (with ``kernels``, which it requires) otherwise swaps layers such as RMSNorm and the rotary
# embedding for kernels it downloads at load on CUDA, and again whenever ``train()``/``eval()``
# change mode, which also drops kernels put in by the config (``kernels: liger``). What runs is
# the config's choice, offline.
NO_HUB_KERNELS = {"use_kernels": False}


def quiet_transformers() -> None:
    """Keep transformers' per-load progress bars and advice off the user's terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(hf_path: str | Path):
    """The model's own tokenizer (with its chat template), as transformers loads it."""
    from transformers import AutoTokenizer

    quiet_transformers()
    return AutoTokenizer.from_pretrained(str(hf_path))


def _gguf_load_kwargs(kwargs: dict) -> dict:
    """Load GGUF weights dequantized to fp32 (save_pretrained refuses packed GGUF weights)."""
    import torch

    kwargs = dict(kwargs, dtype=torch.float32)
    try:
        from transformers import GgufConfig  # transformers >= 5.x

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    return kwargs
