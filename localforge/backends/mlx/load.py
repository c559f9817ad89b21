"""What mlx-lm needs to load a HF folder the way transformers does."""

from __future__ import annotations

import json
from pathlib import Path

from localforge.models import portable_config


def model_config(hf_path: str | Path) -> dict:
    """Config keys to hand ``mlx_lm.load`` for ``hf_path``: those mlx-lm reads from older layouts.

    A folder saved by transformers 5 keeps ``rope_theta`` only under ``rope_parameters``, where
    mlx-lm does not look; without it mlx-lm falls back to a RoPE base of 10000.
    """
    cfg = json.loads((Path(hf_path) / "config.json").read_text())
    return {k: v for k, v in portable_config(dict(cfg)).items() if k not in cfg}
