"""LoRA adapters that move between mlx-lm and PEFT: formats, conversion, fingerprints.

Core, below the backends and the jobs that both use it: it imports numpy alone (safetensors
files are read and written here byte for byte). Fusing an adapter into its base model needs an
engine and lives with one (``backends.fuse``).

The two on-disk layouts (``detect`` tells them apart):

- mlx-lm: ``adapter_config.json`` with ``fine_tune_type`` and ``lora_parameters`` (``rank``,
  ``scale``, ``dropout``, ``keys``) and ``num_layers``, beside ``adapters.safetensors``.
- PEFT: ``adapter_config.json`` with ``peft_type`` (``r``, ``lora_alpha``, ``target_modules``,
  ``layers_to_transform``, ``use_dora``), beside ``adapter_model.safetensors``.

The same update in both. MLX computes ``y += scale * (x @ lora_a) @ lora_b`` with ``lora_a``
[in, r] and ``lora_b`` [r, out]; PEFT computes ``y += (lora_alpha / r) * x @ A.T @ B.T`` with
``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]. So ``lora_A = lora_a.T``,
``lora_B = lora_b.T`` and ``lora_alpha = scale * r`` (``scale * sqrt(r)`` read back under
``use_rslora``). DoRA adds a magnitude per output row, the same vector in both (MLX ``m``, PEFT
``lora_magnitude_vector``): both rescale each row of the adapted weight to it.

Tensor names: MLX ``model.layers.3.self_attn.q_proj.lora_a`` is PEFT
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``. MLX ``keys`` are module paths
inside a block (``self_attn.q_proj``); they are written as PEFT ``target_modules`` unchanged
(PEFT matches them as name suffixes), and the modules the tensors name are the ground truth in
both directions. MLX ``num_layers`` means the last N blocks (-1: all); PEFT
``layers_to_transform`` lists block indices (null: all). Turning one into the other takes the
base model's block count, read from its ``config.json`` or its GGUF metadata; the base is the
adapter's ``base_model_name_or_path`` (PEFT), ``base_model`` or ``model`` (MLX), or ``base=``.

Conversion reads and writes safetensors files with numpy alone (bfloat16 is moved as raw 16-bit
words: a transpose is only a permutation), keeps each tensor's dtype, and refuses what has no
exact equivalent on the other side rather than guessing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from localforge.errors import ConfigError, CorruptFile, LocalforgeError
from localforge.files import check_safetensors

CONFIG = "adapter_config.json"
WEIGHTS = {"mlx": "adapters.safetensors", "peft": "adapter_model.safetensors"}
FORMATS = tuple(WEIGHTS)
EXPECTED = ("an mlx-lm adapter folder (adapter_config.json + adapters.safetensors) "
            "or a PEFT one (adapter_config.json + adapter_model.safetensors)")
PEFT_PREFIX = "base_model.model."
# Per-module leaves: MLX name, PEFT name, and our neutral name (PEFT orientation).
MLX_LEAVES = {"lora_a": "A", "lora_b": "B", "m": "M"}
PEFT_LEAVES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "M"}
# PEFT settings that change what the adapter computes in ways mlx-lm has no equivalent for.
PEFT_UNPORTABLE = ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication",
                   "target_parameters", "trainable_token_indices", "lora_bias", "fan_in_fan_out",
                   "use_qalora", "alora_invocation_tokens", "use_bdlora", "arrow_config",
                   "kasa_config", "velora_config", "monteclora_config")
BLOCK = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<key>.+)$")  # the first numbered segment


# --- public API ---------------------------------------------------------------------------------


def detect(path: str | Path) -> str:
    """``"mlx"`` or ``"peft"`` for an adapter folder; ``ConfigError`` for anything else."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"adapter '{folder}' is not a folder: expected {EXPECTED}")
    if not (folder / CONFIG).is_file() and (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is a model folder (a full fine-tune or a fused model), not an adapter: "
                          f"pass it as --model {folder}")
    cfg = _read_config(folder)
    if "peft_type" in cfg:
        fmt = "peft"
    elif "lora_parameters" in cfg or "fine_tune_type" in cfg:
        fmt = "mlx"
    else:
        raise ConfigError(f"{folder / CONFIG} has neither 'peft_type' (PEFT) nor 'lora_parameters' "
                          f"(mlx-lm): expected {EXPECTED}")
    if not (folder / WEIGHTS[fmt]).is_file():
        hint = (" (adapter_model.bin is not supported: save with safe_serialization=True)"
                if fmt == "peft" and (folder / "adapter_model.bin").is_file() else "")
        raise ConfigError(f"{folder} is a {_label(fmt)} adapter config without {WEIGHTS[fmt]}{hint}")
    check_safetensors(folder / WEIGHTS[fmt])
    return fmt


def convert(src: str | Path, to: str, out: str | Path, base: str | None = None) -> Path:
    """Convert the adapter at ``src`` to format ``to`` ("mlx" or "peft") in the folder ``out``.

    ``base`` (a model reference) overrides the base model named in the adapter config; it is
    read only when the layer selection needs the base's block count.
    """
    if to not in FORMATS:
        raise ConfigError(f"unknown adapter format '{to}': use mlx or peft")
    src, out = Path(src), Path(out)
    fmt = detect(src)
    if fmt == to:
        raise ConfigError(f"{src} is already a {_label(to)} adapter: nothing to convert")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} exists and is not empty: choose a new one")
    lora = _read(src, fmt, base)
    out.mkdir(parents=True, exist_ok=True)
    (_write_peft if to == "peft" else _write_mlx)(lora, out)
    return out


def as_format(adapter: str | Path, fmt: str, base: str | None = None) -> Path:
    """The adapter in format ``fmt``: itself if it already is, else a converted copy, cached
    under ``cache_dir()/adapters`` by a hash of its files (and of ``base``)."""
    adapter = Path(adapter)
    if detect(adapter) == fmt:
        return adapter
    from localforge.models import cache_dir

    target = cache_dir() / "adapters" / f"{adapter.name}-{fmt}-{fingerprint(adapter, base)}"
    if (target / CONFIG).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        convert(adapter, fmt, tmp, base)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            if not (target / CONFIG).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fingerprint(adapter: str | Path, *extra: Any) -> str:
    """A short hash of an adapter's config and weights (and of ``extra``), for cache keys."""
    adapter = Path(adapter)
    h = hashlib.sha256(repr(extra).encode())
    for name in (CONFIG, WEIGHTS[detect(adapter)]):
        with open(adapter / name, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


def misfit(adapter: str | Path, model: str, exc: Exception) -> ConfigError:
    """The one-line error for an adapter that an engine could not apply to ``model``."""
    detail = " ".join(line.strip() for line in str(exc).splitlines()[:2] if line.strip())
    return ConfigError(f"adapter {adapter} does not fit model '{model}' (made for another base?): "
                       f"{detail[:300] or type(exc).__name__}")


# --- the neutral form ---------------------------------------------------------------------------


@dataclass
class _Lora:
    """An adapter in memory: per module path, tensors ``A`` [r, in], ``B`` [out, r] and DoRA's
    ``M`` [out], each as (safetensors dtype, array); and the settings both formats share."""

    source: Path
    modules: dict[str, dict[str, tuple[str, np.ndarray]]]
    rank: int
    scale: float
    dropout: float
    dora: bool
    blocks: list[int] | None  # the block indices it covers; None: all of them
    base: str | None  # the base model reference (read only when its block count is needed)


def _read(src: Path, fmt: str, base: str | None) -> _Lora:
    cfg = _read_config(src)
    if base:
        _base_blocks(base, src)  # a base given by hand must resolve, whether or not it is needed
    lora = (_read_peft if fmt == "peft" else _read_mlx)(src, cfg, base or _named_base(cfg, fmt))
    _check(lora)
    return lora


def _read_mlx(src: Path, cfg: dict, base: str | None) -> _Lora:
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise ConfigError(f"{src}: fine_tune_type '{kind}' is not a LoRA adapter (lora and dora convert)")
    params = cfg.get("lora_parameters") or {}
    if not all(isinstance(v, int | float) for v in (params.get("rank"), params.get("scale"), cfg.get("num_layers"))):
        raise ConfigError(f"{src / CONFIG}: expected num_layers and lora_parameters with rank and scale")
    modules = _group(src, read_safetensors(src / WEIGHTS["mlx"])[0], MLX_LEAVES, "", transpose=True)
    n = int(cfg["num_layers"])
    blocks = None if n < 0 else _last_blocks(n, src, modules, base)
    return _Lora(src, modules, int(params["rank"]), float(params["scale"]),
                 float(params.get("dropout", 0.0)), kind == "dora", blocks, base)


def _read_peft(src: Path, cfg: dict, base: str | None) -> _Lora:
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{src}: peft_type '{cfg.get('peft_type')}' is not LORA; only LoRA and DoRA convert")
    for key in PEFT_UNPORTABLE:
        if cfg.get(key):
            raise ConfigError(f"{src}: '{key}' is set ({cfg[key]!r}); mlx-lm adapters have no equivalent")
    if cfg.get("bias", "none") != "none":
        raise ConfigError(f"{src}: bias '{cfg['bias']}' trains biases; mlx-lm adapters have none (use bias='none')")
    if not isinstance(cfg.get("r"), int) or not isinstance(cfg.get("lora_alpha"), int | float):
        raise ConfigError(f"{src / CONFIG}: expected an integer 'r' and a number 'lora_alpha'")
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    modules = _group(src, read_safetensors(src / WEIGHTS["peft"])[0], PEFT_LEAVES, PEFT_PREFIX, transpose=False)
    layers = cfg.get("layers_to_transform")
    blocks = None if layers is None else sorted({layers} if isinstance(layers, int) else set(layers))
    return _Lora(src, modules, r, scale, float(cfg.get("lora_dropout") or 0.0), bool(cfg.get("use_dora")),
                 blocks, base)


def _group(src: Path, tensors: dict, leaves: dict[str, str], prefix: str, transpose: bool) -> dict:
    """Tensors by module path, under the neutral leaf names, in PEFT orientation."""
    modules: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for name, (dtype, arr) in tensors.items():
        leaf = next((s for s in leaves if name.endswith("." + s)), None)
        if leaf is None or not name.startswith(prefix):
            raise ConfigError(f"{src}: unexpected tensor '{name}' (expected {prefix}<module>."
                              f"{{{', '.join(leaves)}}}); it cannot be converted")
        module = name[len(prefix): -len(leaf) - 1]
        if arr.ndim == 2 and transpose:
            arr = arr.T
        modules.setdefault(module, {})[leaves[leaf]] = (dtype, arr)
    if not modules:
        raise ConfigError(f"{src}: the adapter has no tensors")
    return modules


def _check(lora: _Lora) -> None:
    """Refuse what would not load, or not compute the same, on the other side."""
    want = {"A", "B", "M"} if lora.dora else {"A", "B"}
    prefixes = set()
    for module, leaves in lora.modules.items():
        if set(leaves) != want:
            raise ConfigError(f"{lora.source}: module '{module}' has {sorted(leaves)}, expected {sorted(want)}"
                              f"{' (DoRA)' if lora.dora else ''}")
        a, b = leaves["A"][1], leaves["B"][1]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != lora.rank or b.shape[1] != lora.rank:
            raise ConfigError(f"{lora.source}: module '{module}' has shapes A{list(a.shape)} B{list(b.shape)}, "
                              f"not rank {lora.rank} as configured")
        if lora.dora and leaves["M"][1].shape != (b.shape[0],):
            raise ConfigError(f"{lora.source}: module '{module}' has a magnitude of shape "
                              f"{list(leaves['M'][1].shape)}, expected [{b.shape[0]}]")
        match = BLOCK.match(module)
        if match is None:
            raise ConfigError(f"{lora.source}: module '{module}' is outside the numbered blocks; "
                              "mlx-lm adapters only cover modules inside blocks")
        prefixes.add(match["prefix"])
        if lora.blocks is not None and int(match["index"]) not in lora.blocks:
            raise ConfigError(f"{lora.source}: module '{module}' is outside the configured blocks {lora.blocks}")
    if len(prefixes) > 1:
        raise ConfigError(f"{lora.source}: modules sit under several block lists ({', '.join(sorted(prefixes))})")


def _keys(lora: _Lora) -> list[str]:
    return sorted({BLOCK.match(m)["key"] for m in lora.modules})  # type: ignore[index]


def _last_blocks(n: int, src: Path, modules: dict, base: str | None) -> list[int] | None:
    """MLX ``num_layers`` as block indices (None: all blocks)."""
    present = {int(m["index"]) for m in map(BLOCK.match, modules) if m}
    if present and min(present) == 0 and max(present) < n:  # reaches block 0: it covers all
        return None
    total = _base_blocks(base, src)
    return None if n >= total else list(range(total - n, total))


# --- writers ------------------------------------------------------------------------------------


def _write_peft(lora: _Lora, out: Path) -> None:
    tensors = {}
    names = {"A": "lora_A.weight", "B": "lora_B.weight", "M": "lora_magnitude_vector"}
    for module, leaves in lora.modules.items():
        for leaf, (dtype, arr) in leaves.items():
            tensors[f"{PEFT_PREFIX}{module}.{names[leaf]}"] = (dtype, arr)
    alpha = lora.scale * lora.rank
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": lora.base,
        "r": lora.rank, "lora_alpha": int(alpha) if alpha == int(alpha) else alpha,
        "lora_dropout": lora.dropout, "target_modules": _keys(lora), "layers_to_transform": lora.blocks,
        "layers_pattern": None, "use_dora": lora.dora, "use_rslora": False, "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    _write_safetensors(out / WEIGHTS["peft"], tensors, {"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _write_mlx(lora: _Lora, out: Path) -> None:
    tensors = {}
    names = {"A": "lora_a", "B": "lora_b", "M": "m"}
    for module, leaves in lora.modules.items():
        for leaf, (dtype, arr) in leaves.items():
            tensors[f"{module}.{names[leaf]}"] = (dtype, arr.T if arr.ndim == 2 else arr)
    if lora.blocks is None:
        num_layers = -1
    else:
        total = _base_blocks(lora.base, lora.source)
        n = len(lora.blocks)
        if lora.blocks != list(range(total - n, total)):
            raise ConfigError(f"{lora.source}: layers_to_transform {lora.blocks} is not the last blocks of "
                              f"the {total}-block base; mlx-lm adapters always cover the last N blocks")
        num_layers = n
    config = {
        "fine_tune_type": "dora" if lora.dora else "lora", "num_layers": num_layers,
        "lora_parameters": {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout,
                            "keys": _keys(lora)},
        "model": lora.base,
    }
    _write_safetensors(out / WEIGHTS["mlx"], tensors, {"format": "mlx"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


# --- base models --------------------------------------------------------------------------------


def base_ref(adapter: str | Path) -> str | None:
    """The base model the adapter config names (PEFT ``base_model_name_or_path``, mlx-lm
    ``base_model`` or ``model``), or None."""
    return _named_base(_read_config(Path(adapter)), detect(adapter))


def _named_base(cfg: dict, fmt: str) -> str | None:
    if fmt == "peft":
        return cfg.get("base_model_name_or_path")
    return cfg.get("base_model") or cfg.get("model")


def resolve_base(adapter: str | Path, ref: str | Path | None):
    """The base model ``ref`` resolved (``models.ResolvedModel``); one-line errors that say to pass
    --base when the adapter names none or the one it names cannot be found."""
    if not ref:
        raise ConfigError(f"{adapter}: the adapter config names no base model, and it is needed here: "
                          "pass --base MODEL")
    from localforge.models import resolve

    try:
        return resolve(str(ref))
    except LocalforgeError as exc:
        raise base_error(adapter, ref, exc) from None


def base_error(adapter: str | Path, ref: str | Path, exc: Exception) -> ConfigError:
    return ConfigError(f"base model '{ref}' of {adapter}: {exc} (or pass --base MODEL)")


def _base_blocks(ref: str | Path | None, adapter: Path) -> int:
    from localforge.models import block_count

    resolved = resolve_base(adapter, ref)
    try:
        return block_count(resolved)
    except LocalforgeError as exc:
        raise base_error(adapter, ref, exc) from None


# --- files --------------------------------------------------------------------------------------


def _label(fmt: str) -> str:
    return {"mlx": "mlx-lm", "peft": "PEFT"}[fmt]


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise ConfigError(f"{folder} has no {CONFIG}: expected {EXPECTED}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFile(path, f"not JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise CorruptFile(path, "not a JSON object", f"expected {EXPECTED}")
    return cfg


# safetensors dtype -> numpy dtype; bfloat16 travels as its raw 16-bit words
_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def read_safetensors(path: Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict]:
    """The tensors of a safetensors file as {name: (dtype, array)}, and its metadata."""
    data = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8: 8 + n])
        meta = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, info in header.items():
            if info["dtype"] not in _NUMPY:
                raise ConfigError(f"{path}: tensor '{name}' has dtype {info['dtype']}; "
                                  f"adapters convert in {', '.join(_NUMPY)}")
            start, end = info["data_offsets"]
            arr = np.frombuffer(data[8 + n + start: 8 + n + end], dtype=_NUMPY[info["dtype"]])
            tensors[name] = (info["dtype"], arr.reshape(info["shape"]))
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise CorruptFile(path, f"not a safetensors file: {type(exc).__name__}: {exc}") from None
    return tensors, meta


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]], meta: dict) -> None:
    header: dict[str, Any] = {"__metadata__": meta}
    blobs, offset = [], 0
    for name in sorted(tensors):
        dtype, arr = tensors[name]
        blob = np.ascontiguousarray(arr, dtype=_NUMPY[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
