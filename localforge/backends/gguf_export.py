"""Writing a GGUF file from a Hugging Face folder, for ``localforge export``.

The converter is llama.cpp's own ``convert_hf_to_gguf.py`` with its ``conversion/`` package and
its ``gguf-py``, taken from the source distribution of the installed llama-cpp-python, so the
file is written by the same llama.cpp version that loads it. ``install_converter`` unpacks those
three parts (nothing else) once into ``cache_dir()/tools/llama.cpp-convert-<version>/``; it is
run at setup time (``localforge export setup``), which asks pip for the sdist (pip's cache makes a
repeat offline). ``to_gguf`` runs the converter in a subprocess with that ``gguf-py`` first on
``PYTHONPATH`` (the ``gguf`` package on PyPI can lag behind the converter).

The converter writes f32, f16, bf16 and q8_0 itself; the other types (q4_k_m, ...) are
quantized from its f16 file by llama.cpp's ``llama_model_quantize`` through llama-cpp-python.
Nothing here is imported at module level beyond the standard library.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from localforge.errors import ConfigError, LocalforgeError, MissingDependency

DIST = "llama-cpp-python"  # the distribution whose sdist carries the converter
CONVERTER = "convert_hf_to_gguf.py"
PARTS = (CONVERTER, "conversion/", "gguf-py/", "LICENSE")  # what is unpacked from vendor/llama.cpp/
# GGUF types: the converter writes the first four; the rest are quantized from its f16 file.
WRITTEN = ("f16", "q8_0", "bf16", "f32")
QUANTIZED = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
GGUF_TYPES = (*WRITTEN, *QUANTIZED)


@dataclass(frozen=True)
class ExportTarget:
    """What ``localforge export --to NAME`` writes; the job reads these flags, not the names."""

    name: str
    what: str  # for people: --help and errors
    gguf: bool  # writes a GGUF file
    modelfile: bool  # writes an Ollama Modelfile beside it
    folder: bool  # OUT is a folder (else the .gguf file itself)


EXPORT_TARGETS = {t.name: t for t in (
    ExportTarget("hf", "a merged Hugging Face folder (safetensors, tokenizer, chat template)", False, False, True),
    ExportTarget("gguf", "one GGUF file for llama.cpp (OUT ends in .gguf)", True, False, False),
    ExportTarget("ollama", "a folder with the GGUF and a Modelfile for `ollama create`", True, True, True),
)}


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version (read from its metadata, without importing it)."""
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        raise MissingDependency("writing a GGUF file", "llamacpp", "llama_cpp") from None


def converter_dir(version: str | None = None) -> Path:
    from localforge.models import cache_dir

    return cache_dir() / "tools" / f"llama.cpp-convert-{version or llama_cpp_version()}"


def setup_command() -> str:
    return "localforge export setup"


def converter() -> Path:
    """The converter folder for the installed llama-cpp-python; a one-line error saying what to run
    when it is not set up."""
    folder = converter_dir()
    if not (folder / CONVERTER).is_file() or not (folder / "gguf-py" / "gguf").is_dir():
        raise ConfigError(f"writing GGUF needs llama.cpp's converter for {DIST} {llama_cpp_version()}, which is "
                          f"not set up in {folder.parent}: run `{setup_command()}` once (it fetches the "
                          f"{DIST} source distribution with pip)")
    return folder


def install_converter(sdist: str | Path | None = None) -> Path:
    """Unpack the converter from the sdist of the installed llama-cpp-python (``sdist``, or one pip
    downloads) into ``converter_dir()``; return that folder. A second call finds it there."""
    version = llama_cpp_version()
    target = converter_dir(version)
    if (target / CONVERTER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as down:
        if sdist is None:
            sdist = _download_sdist(version, Path(down))
        sdist = Path(sdist)
        if not re.fullmatch(rf"llama_cpp_python-{re.escape(version)}\.tar\.gz", sdist.name):
            raise ConfigError(f"--sdist {sdist}: expected llama_cpp_python-{version}.tar.gz, the source "
                              f"distribution of the installed {DIST}")
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            _unpack(sdist, tmp)
            os.replace(tmp, target)
        except OSError:
            if not (target / CONVERTER).is_file():  # not another process finishing first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _download_sdist(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"{DIST}=={version}", "--no-deps", "--no-binary", ":all:",
           "--quiet", "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        why = _last_line(proc.stderr or proc.stdout) or f"exit code {proc.returncode}"
        raise LocalforgeError(f"pip could not fetch the {DIST} {version} source distribution ({why}): "
                              f"download it elsewhere and run `{setup_command()} --sdist FILE`")
    return found[0]


def _unpack(sdist: Path, out: Path) -> None:
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            wanted = []
            for member in tar.getmembers():
                parts = member.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/REST
                if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and (member.isfile() or member.isdir()):
                    rest = parts[3]
                    if any(rest == p or (p.endswith("/") and rest.startswith(p)) for p in PARTS):
                        member.name = rest
                        wanted.append(member)
            tar.extractall(out, members=wanted, filter="data")
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ConfigError(f"--sdist {sdist}: not a readable source distribution ({exc})") from None
    if not (out / CONVERTER).is_file() or not (out / "gguf-py" / "gguf").is_dir():
        raise ConfigError(f"--sdist {sdist} has no vendor/llama.cpp/{CONVERTER} with its gguf-py")


def to_gguf(hf_dir: str | Path, out: str | Path, quant: str = "f16",
            on_event: Callable[..., None] = lambda kind, **data: None) -> Path:
    """Write the HF folder ``hf_dir`` as the GGUF file ``out`` of type ``quant`` (``GGUF_TYPES``)."""
    hf_dir, out = Path(hf_dir).absolute(), Path(out).absolute()  # the converter runs in its own folder
    if quant not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type '{quant}': use one of {', '.join(GGUF_TYPES)}")
    tool = converter()
    written = out if quant in WRITTEN else out.with_name(out.stem + ".f16.gguf")
    on_event("step", what=f"writing {'f16' if written != out else quant} GGUF with llama.cpp's converter")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tool / "gguf-py"), str(tool),
                                                        os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, str(tool / CONVERTER), str(hf_dir), "--outfile", str(written),
           "--outtype", "f16" if written != out else quant]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tool))
    if proc.returncode != 0 or not written.is_file():
        raise LocalforgeError(f"llama.cpp's converter could not convert {hf_dir} to GGUF: "
                              f"{_why(proc.stdout + proc.stderr)}")
    if written != out:
        on_event("step", what=f"quantizing to {quant} with llama.cpp")
        _quantize(written, out, quant)
        written.unlink()
    return out


_QUANTIZE = """
import sys
import llama_cpp
src, out, ftype, threads = sys.argv[1:]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
params.nthread = int(threads)
sys.exit(llama_cpp.llama_model_quantize(src.encode(), out.encode(), params))
"""


def _quantize(src: Path, out: Path, quant: str) -> None:
    """llama.cpp's quantizer, in a subprocess: its log goes to the C stderr, which is kept off the terminal."""
    from importlib.util import find_spec

    from localforge.hardware import default_threads

    if find_spec("llama_cpp") is None:
        raise MissingDependency(f"quantizing a GGUF to {quant}", "llamacpp", "llama_cpp")
    proc = subprocess.run([sys.executable, "-c", _QUANTIZE, str(src), str(out), QUANTIZED[quant],
                           str(default_threads())], capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        raise LocalforgeError(f"llama.cpp could not quantize {src.name} to {quant}: "
                              f"{_why(proc.stdout + proc.stderr)}")


def _why(log: str) -> str:
    """The line of the converter's log that says what went wrong."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("ERROR:", "NotImplementedError", "ValueError", "KeyError", "FileNotFoundError")):
            return line[:300]
    return (lines[-1][:300] if lines else "no output")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""
