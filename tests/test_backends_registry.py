"""Backends resolve by name, import lazily, and `auto` picks by hardware."""

from __future__ import annotations

import subprocess
import sys

import pytest

from localforge.backends import (
    REGISTRY,
    BackendUnavailable,
    availability,
    backend_class,
    choose_auto,
)
from localforge.errors import ConfigError
from localforge.hardware import examples

ALL = {"mlx": True, "torch": True, "llamacpp": True, "vllm": True, "ollama": True}
PROFILES = examples()


@pytest.mark.parametrize(
    "profile, available, servers, formats, expected",
    [
        ("m3-max-128gb", ALL, (), ("hf", "gguf"), "mlx"),
        ("m3-max-128gb", {**ALL, "mlx": False}, (), ("gguf",), "llamacpp"),
        ("4x-h100-80gb", ALL, (), ("hf",), "vllm"),
        ("4x-h100-80gb", {**ALL, "vllm": False}, (), ("hf",), "torch"),
        ("cpu-laptop-16gb", ALL, ("ollama",), ("gguf",), "ollama"),
        ("cpu-laptop-16gb", ALL, (), ("gguf",), "llamacpp"),
        ("cpu-laptop-16gb", ALL, (), ("hf",), "torch"),  # llama.cpp needs a GGUF
        ("cpu-laptop-16gb", {"mlx": True}, (), ("hf",), "mlx"),
    ],
)
def test_auto_choice(profile, available, servers, formats, expected):
    assert choose_auto(PROFILES[profile], available, servers, formats) == expected


def test_auto_with_nothing_installed_says_what_to_install():
    with pytest.raises(BackendUnavailable, match=r"pip install 'localforge\[torch\]'"):
        choose_auto(PROFILES["cpu-laptop-16gb"], {})


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown backend 'nope': choose one of auto, mlx, torch, llamacpp, vllm, openai, lmstudio, vllm-server, ollama"):
        backend_class("nope")


def test_availability_reads_without_importing():
    ok, reason = availability("torch")
    assert ok and reason == "installed"
    assert availability("nope") == (False, "unknown backend 'nope'")


def test_missing_engine_names_the_extra(monkeypatch):
    from localforge import backends

    monkeypatch.setitem(
        REGISTRY, "ghost",
        backends.BackendSpec("ghost", "x:Y", ("no_such_module_xyz",), "ghost", "nowhere"),
    )
    assert availability("ghost") == (
        False, "'no_such_module_xyz' is not installed: pip install 'localforge[ghost]'"
    )
    with pytest.raises(BackendUnavailable, match="backend 'ghost' is not available"):
        backend_class("ghost")


def test_every_installed_backend_class_loads():
    installed = [name for name in REGISTRY if availability(name)[0]]
    assert set(installed) >= {"torch", "mlx", "llamacpp", "openai", "lmstudio", "vllm-server", "ollama"}
    for name in installed:
        assert backend_class(name).name == name


def test_vllm_without_vllm_says_what_to_install():
    from importlib.util import find_spec

    if find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    assert availability("vllm") == (False, "'vllm' is not installed: pip install 'localforge[vllm]'")


HEAVY = ("torch", "mlx", "transformers", "llama_cpp", "mlx_lm", "numpy")


def test_help_and_registry_import_no_heavy_stack():
    code = (
        "import sys\n"
        "from localforge.backends import availability, REGISTRY\n"
        "[availability(n) for n in REGISTRY]\n"
        "from localforge.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
