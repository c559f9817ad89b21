"""Backends resolve by name, import lazily, and `auto` picks by hardware."""

from __future__ import annotations

import subprocess
import sys

import pytest

from localforge.backends import (
    REGISTRY,
    BackendUnavailable,
    EngineSpec,
    availability,
    backend_class,
    choose,
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
    assert choose(PROFILES[profile], available, servers, formats)[0] == expected


@pytest.mark.parametrize("profile, available, expected", [
    ("m3-max-128gb", ALL, "mlx"),
    ("4x-h100-80gb", ALL, "torch"),  # vLLM generates, it does not train
    ("cpu-laptop-16gb", ALL, "torch"),
    ("cpu-laptop-16gb", {"mlx": True, "llamacpp": True}, "mlx"),
])
def test_auto_for_training_chooses_among_engines_that_train(profile, available, expected):
    assert choose(PROFILES[profile], available, ("ollama",), train="lora")[0] == expected


def test_auto_with_an_adapter_chooses_among_engines_that_load_one():
    assert choose(PROFILES["cpu-laptop-16gb"], ALL, ("ollama",), ("gguf",), adapters=True)[0] == "torch"
    with pytest.raises(BackendUnavailable, match="no installed backend trains 'lora'"):
        choose(PROFILES["cpu-laptop-16gb"], {"llamacpp": True}, train="lora")


def test_every_engine_declares_a_whole_spec():
    for name, spec in REGISTRY.items():
        assert spec.name == name and spec.generate.count(":") == 1 and spec.requires and spec.runs_on
        assert set(spec.devices) <= {"cuda", "metal", "mps", "cpu"} and set(spec.prefers) <= set(spec.devices)
        assert spec.server == (spec.formats == ("served",))
        if spec.trains:
            assert spec.methods and spec.packages and set(spec.runtime_bytes) == set(spec.devices), name


def test_auto_with_nothing_installed_says_what_to_install():
    with pytest.raises(BackendUnavailable, match=r"pip install 'localforge\[torch\]'"):
        choose(PROFILES["cpu-laptop-16gb"], {})


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown backend 'nope': choose one of auto, mlx, torch, llamacpp, vllm, openai, lmstudio, vllm-server, ollama"):
        backend_class("nope")


def test_availability_reads_without_importing():
    ok, reason = availability("torch")
    assert ok and reason == "installed"
    assert availability("nope") == (False, "unknown backend 'nope'")


def test_missing_engine_names_the_extra(monkeypatch):
    monkeypatch.setitem(
        REGISTRY, "ghost",
        EngineSpec(name="ghost", label="Ghost", generate="x:Y", requires=("no_such_module_xyz",), extra="ghost",
                   runs_on="nowhere"),
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
