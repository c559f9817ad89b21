"""Export what fine-tuning made: a run folder, an adapter or a HF model folder, to a merged HF
folder, a GGUF file or an Ollama folder (GGUF + Modelfile).

``plan`` checks everything that can be checked before a byte is written (the source, the
target, the GGUF type, the output, the converter, the chat template for a Modelfile) and says
what ``export`` will do; ``export`` does it in a temporary folder beside the output and renames
it into place at the end, so an interrupted export leaves nothing half-written at OUT.

The engine work goes through ``localforge.backends``: ``fuse`` (merging an adapter into its
base) and ``to_gguf`` (llama.cpp's converter); what a target writes is data there
(``EXPORT_TARGETS``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localforge.errors import ConfigError, CorruptFile, UsageError

Events = Callable[..., None]


@dataclass
class Source:
    """What to export: a model folder as is, or an adapter on its base."""

    path: Path  # what the user named
    kind: str  # "run", "adapter" or "model"
    adapter: Path | None = None
    model_dir: Path | None = None  # the HF folder (kind model, or a full run's model/)
    base: str | None = None  # the adapter's base model reference

    @property
    def chat_dir(self) -> Path:
        """The folder whose tokenizer files (and chat template) the export keeps."""
        if self.model_dir is not None:
            return self.model_dir
        from localforge.adapters import resolve_base
        from localforge.backends import ensure_hf

        return Path(ensure_hf(resolve_base(self.adapter, self.base)))


@dataclass
class Plan:
    source: Source
    target: object  # a backends.ExportTarget
    out: Path
    quant: str | None
    name: str | None  # the Ollama model name, for a Modelfile
    modelfile: object | None = None  # the ChatShape, checked up front


@dataclass
class Result:
    path: Path
    gguf: Path | None
    command: str | None  # what to run next (ollama create ...)
    seconds: float
    bytes: int


def find_source(path: str | Path, base: str | None = None) -> Source:
    """Tell a run folder, an adapter folder and a HF model folder apart; one-line errors otherwise."""
    from localforge.adapters import CONFIG, base_ref, detect
    from localforge.models import is_hf_folder

    raw = Path(path).expanduser()
    where = f"RUN_DIR|ADAPTER {path}"
    if not raw.exists():
        raise ConfigError(f"{where} does not exist: give a fine-tuning run folder, an adapter folder or a HF model folder")
    if not raw.is_dir():
        raise ConfigError(f"{where} is a file, not a folder: give a fine-tuning run folder, an adapter folder "
                          "or a HF model folder")
    folder = raw.resolve()
    if (folder / "run.json").is_file():
        return _run_source(raw, folder, base)
    if (folder / CONFIG).is_file():
        detect(folder)
        return Source(raw, "adapter", adapter=folder, base=base or base_ref(folder))
    if is_hf_folder(folder):
        if base:
            raise UsageError(f"--base is for adapters; {path} is a model folder")
        return Source(raw, "model", model_dir=folder)
    raise ConfigError(f"{where} is neither a fine-tuning run (run.json), an adapter (adapter_config.json) nor "
                      "a HF model folder (config.json with weights)")


def _run_source(raw: Path, folder: Path, base: str | None) -> Source:
    from localforge.adapters import detect
    from localforge.finetune.run import RunDir
    from localforge.models import is_hf_folder

    run = RunDir(folder)
    manifest = _read_json(run.manifest) if run.manifest.is_file() else {}
    status = manifest.get("status", "not started")
    if status != "completed":
        reason = f": {manifest['reason']}" if manifest.get("reason") else ""
        raise ConfigError(f"run {raw} is not completed (status '{status}'{reason}): finish it with "
                          f"`localforge finetune resume {raw}` and export it then")
    if run.adapter.is_dir():
        detect(run.adapter)
        info = _read_json(run.info)
        return Source(raw, "run", adapter=run.adapter, base=base or info.get("model_path") or manifest.get("model_path"))
    if run.model.is_dir() and is_hf_folder(run.model):
        if base:
            raise UsageError(f"--base is for adapters; run {raw} is a full fine-tune (model/)")
        return Source(raw, "run", model_dir=run.model)
    raise ConfigError(f"run {raw} is completed but has neither adapter/ nor model/: it was moved or cut; "
                      "export its adapter or model folder directly")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFile(path, f"not JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CorruptFile(path, "not a JSON object")
    return data


def plan(path: str | Path, to: str, out: str | Path, quant: str | None = None, name: str | None = None,
         base: str | None = None) -> Plan:
    """Check the whole export before anything is written; return what ``export`` will do."""
    from localforge.backends import EXPORT_TARGETS, GGUF_TYPES, converter

    if to not in EXPORT_TARGETS:
        raise UsageError(f"--to {to!r} is not an export target: use {', '.join(EXPORT_TARGETS)}")
    target = EXPORT_TARGETS[to]
    if target.gguf:
        quant = quant or GGUF_TYPES[0]
        if quant not in GGUF_TYPES:
            raise UsageError(f"--quant {quant!r} is not a GGUF type: use {', '.join(GGUF_TYPES)}")
    elif quant:
        raise UsageError(f"--quant is for GGUF targets; --to {to} writes the weights in the base's dtype")
    if name is not None and not target.modelfile:
        raise UsageError(f"--name is the model name in a Modelfile; --to {to} writes none")
    if name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9._-]*(:[a-z0-9._-]+)?", name):
        raise UsageError(f"--name {name!r}: use lowercase letters, digits, '.', '_' and '-' (and an optional :tag)")
    out = Path(out).expanduser().absolute()
    if not target.folder and out.suffix != ".gguf":
        raise UsageError(f"-o {out}: --to {to} writes one file; give its path ending in .gguf")
    taken = (out.exists() and (not out.is_dir() or any(out.iterdir()))) if target.folder else out.exists()
    if taken:
        raise ConfigError(f"-o {out} exists{' and is not empty' if target.folder else ''}: choose a new one")
    if not out.parent.is_dir():
        raise ConfigError(f"-o {out}: the folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise ConfigError(f"-o {out}: the folder {out.parent} is not writable")
    source = find_source(path, base)
    if source.adapter is not None:
        from localforge.adapters import resolve_base

        resolve_base(source.adapter, source.base)
    if target.gguf:
        converter()
    result = Plan(source, target, out, quant, None)
    if target.modelfile:
        from localforge.export.modelfile import chat_shape

        result.modelfile = chat_shape(source.chat_dir)
        result.name = name or _ollama_name(out.name)
    return result


def _ollama_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return name or "model"


def export(p: Plan, on_event: Events = lambda kind, **data: None) -> Result:
    """Do the export ``p`` describes; return what it wrote."""
    from localforge.backends import fuse, to_gguf

    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(dir=p.out.parent, prefix=f".{p.out.name}.tmp-"))
    tmp.chmod(0o755)
    try:
        work = tmp / "merged" if p.target.gguf else tmp
        if p.source.adapter is not None:
            on_event("step", what=f"merging the adapter {p.source.adapter} into its base")
            fuse(p.source.adapter, work, p.source.base)
            model_dir = work
        elif p.target.gguf:
            model_dir = p.source.model_dir
        else:
            on_event("step", what=f"copying {p.source.model_dir}")
            shutil.copytree(p.source.model_dir, work, dirs_exist_ok=True)
            model_dir = work
        gguf = None
        if p.target.gguf:
            stem = p.name.replace(":", "-") if p.target.modelfile else p.out.stem
            gguf = tmp / f"{stem}-{p.quant}.gguf"
            to_gguf(model_dir, gguf, p.quant, on_event)
            if p.target.modelfile:
                from localforge.export.modelfile import modelfile

                (tmp / "Modelfile").write_text(modelfile(gguf.name, p.modelfile, model_dir))
            shutil.rmtree(work, ignore_errors=True)
        on_event("step", what=f"moving the result to {p.out}")
        if p.target.folder:
            os.replace(tmp, p.out)
            final_gguf = p.out / gguf.name if gguf else None
        else:
            os.replace(gguf, p.out)
            final_gguf = p.out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = (final_gguf.stat().st_size if not p.target.folder else
            sum(f.stat().st_size for f in p.out.rglob("*") if f.is_file()))
    command = f"ollama create {p.name} -f {shlex.quote(str(p.out / 'Modelfile'))}" if p.target.modelfile else None
    return Result(p.out, final_gguf, command, time.monotonic() - began, size)
