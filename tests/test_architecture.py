"""The rules the layout keeps (ARCHITECTURE.md), read off the source: every import statement in
the package, at module level or inside functions, parsed with ``ast``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "localforge"
ENGINES = {"torch", "mlx", "mlx_lm", "transformers", "peft", "trl", "accelerate", "llama_cpp", "vllm", "ollama",
           "openai", "liger_kernel"}
JOBS = ("extract", "teach", "finetune", "export", "serve", "pipeline")
CORE = ("errors", "files", "jsonfiles", "hardware", "models", "adapters", "settings", "resumable")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in a file; relative imports resolved against the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            found.append((node.lineno, base))
    return found


def modules(*parts: str) -> list[Path]:
    return sorted(p for part in parts for p in ([PACKAGE / f"{part}.py"] if (PACKAGE / f"{part}.py").is_file()
                                                 else (PACKAGE / part).rglob("*.py")))


def offences(files: list[Path], bad) -> list[str]:
    return [f"{f.relative_to(PACKAGE.parent)}:{line} imports {name}" for f in files
            for line, name in imports(f) if bad(name)]


def test_jobs_import_no_engine():
    jobs = modules(*(j for j in JOBS if (PACKAGE / j).exists()))
    assert jobs, "no job modules found"
    assert offences(jobs, lambda name: name.split(".")[0] in ENGINES) == []


def test_backends_import_no_job_and_no_command():
    above = tuple(f"localforge.{p}" for p in (*JOBS, "commands", "cli"))
    assert offences(modules("backends"), lambda name: name.startswith(above)) == []


def test_core_imports_nothing_above_it():
    above = tuple(f"localforge.{p}" for p in (*JOBS, "backends", "commands", "cli"))
    assert offences(modules(*CORE), lambda name: name.startswith(above)) == []


def test_adapters_need_numpy_alone():
    third_party = {name.split(".")[0] for _, name in imports(PACKAGE / "adapters.py")
                   if name.split(".")[0] not in sys.stdlib_module_names and not name.startswith("localforge")}
    assert third_party <= {"numpy", "safetensors"}


def test_no_engine_name_is_spelled_in_the_jobs_or_the_cli():
    """Engines appear in jobs and commands only as data from the registry, never as names in code."""
    from localforge.backends import REGISTRY

    files = modules(*(j for j in JOBS if (PACKAGE / j).exists()), "commands", "cli")
    found = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in REGISTRY:
                found.append(f"{f.relative_to(PACKAGE.parent)}:{node.lineno} spells '{node.value}'")
    assert found == []


@pytest.mark.parametrize("rule", [test_jobs_import_no_engine, test_backends_import_no_job_and_no_command])
def test_the_rules_catch_an_offence(rule, tmp_path, monkeypatch):
    """A job that imports torch inside a function, and a backend that imports a job, are caught."""
    fake = tmp_path / "localforge"
    for part, text in (("finetune/sneaky.py", "def f():\n    import torch.nn\n"),
                       ("backends/sneaky.py", "def f():\n    from localforge.finetune import run\n")):
        (fake / part).parent.mkdir(parents=True, exist_ok=True)
        (fake / part).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError):
        rule()
