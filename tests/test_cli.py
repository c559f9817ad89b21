"""The CLI as a user runs it: a fresh interpreter, real stdout/stderr and exit codes."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli


def test_doctor_json_has_the_documented_keys():
    out = run_cli("doctor", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in ("os", "arch", "cpu_cores", "memory_bytes", "accelerators", "backends", "recommended_backend"):
        assert key in data, key
    assert data["cpu_cores"] >= 1 and data["memory_bytes"] > 0
    for name in ("torch", "mlx", "llamacpp"):
        assert data["backends"][name]["available"] is True, data["backends"][name]
        assert isinstance(data["backends"][name]["reason"], str)
    assert data["recommended_backend"] in data["backends"]
    # the kernel sets a config can name, and whether they are installed (liger-kernel is not, here)
    assert data["backends"]["torch"]["kernels"] == {"liger": "needs liger-kernel: pip install 'localforge[cuda]' (cuda)"}
    assert data["backends"]["torch"]["compiles_on"] == ["cuda", "cpu"] and data["backends"]["mlx"]["kernels"] == {}
    for acc in data["accelerators"]:
        assert set(acc) >= {"kind", "name", "memory_bytes"}


def test_doctor_table():
    out = run_cli("doctor")
    assert out.returncode == 0, out.stderr
    assert "Backends" in out.stdout and "recommended backend" in out.stdout
    assert "mlx[cpu]" in out.stdout  # rich markup must not eat bracketed text


def test_models_list_and_show():
    out = run_cli("models", "list", "--json")
    assert out.returncode == 0, out.stderr
    assert any(r["name"] == "smollm2-135m" and r["installed"] for r in json.loads(out.stdout))
    show = run_cli("models", "show", "smollm2-135m", "--json")
    data = json.loads(show.stdout)
    assert data["kind"] == "alias" and data["gguf_path"].endswith(".gguf")
    assert "hf_path" in data


@pytest.mark.parametrize(
    "args, code, message",
    [
        (("generate", "hi", "--backend", "nope"), 2, "error: Invalid value for '--backend' / '-b': unknown backend 'nope'"),
        (("generate", "hi", "--model", "no/such-model"), 1, "error: 'no/such-model' is not in the local Hugging Face cache"),
        (("generate", "hi", "--model", "./nothing.gguf"), 1, "error: model file or folder './nothing.gguf' does not exist"),
        (("generate", "hi", "--max-tokens", "0"), 2, "error: Invalid value for '--max-tokens'"),
        (("generate", "hi", "--bogus"), 2, "error: No such option: --bogus"),
        (("models", "show", "nonsense"), 1, "error: unknown model 'nonsense'"),
    ],
)
def test_errors_are_one_line_without_traceback(args, code, message, tmp_path):
    out = run_cli(*args, env={"HF_HUB_CACHE": str(tmp_path)})
    assert out.returncode == code, (out.returncode, out.stderr)
    assert out.stderr.startswith(message), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_help_lists_the_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("doctor", "generate", "models"):
        assert cmd in out.stdout


def test_ctrl_c_exits_130_with_one_line(smol):
    """Ctrl-C while a model generates: exit code 130 and `error: interrupted`, whenever it lands."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "localforge", "generate", "Tell a very long story.",
                             "--backend", "llamacpp", "--max-tokens", "4000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip() == "error: interrupted" and out == ""


def test_mlx_on_linux_says_it_is_slow():
    """doctor's detail and the command that runs it say, once, that MLX on a Linux CPU is slow."""
    import platform

    if platform.system() != "Linux":
        pytest.skip("the caveat is about MLX on a Linux CPU")
    data = json.loads(run_cli("doctor", "--json").stdout)
    assert "slow" in data["backends"]["mlx"]["reason"] and "slow" not in data["backends"]["torch"]["reason"]
    done = run_cli("generate", "hi", "--backend", "mlx", "--max-tokens", "2")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("note: MLX on a Linux CPU (mlx[cpu]) is slow") == 1, done.stderr
    assert "note:" not in run_cli("generate", "hi", "--backend", "llamacpp", "--max-tokens", "2").stderr
