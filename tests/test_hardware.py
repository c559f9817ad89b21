"""HardwareProfile.detect() against faked platform facts, and hand-built profiles."""

from __future__ import annotations

import json

from localforge.hardware import GiB, HardwareProfile, Probe, examples


class FakeProbe(Probe):
    def __init__(self, **facts):
        self.facts = facts

    def _get(self, key, default=None):
        value = self.facts.get(key, default)
        if isinstance(value, Exception):
            raise value
        return value

    def system(self):
        return self._get("system", "Linux")

    def machine(self):
        return self._get("machine", "x86_64")

    def cpu_cores(self):
        return self._get("cores", 8)

    def memory(self):
        return self._get("memory", (16 * GiB, 12 * GiB))

    def sysctl(self, key):
        return self._get("sysctl", {}).get(key)

    def cpu_model(self):
        return self._get("cpu_model", "Test CPU")

    def nvidia_smi(self):
        return self._get("nvidia_smi")

    def cpu_flags(self):
        return self._get("cpu_flags", set())

    def torch_mps(self):
        return self._get("mps")

    def mlx_device(self):
        return self._get("mlx")


def test_apple_silicon_has_unified_memory_and_metal():
    p = HardwareProfile.detect(FakeProbe(
        system="Darwin", machine="arm64", cores=16, memory=(128 * GiB, 100 * GiB),
        sysctl={"machdep.cpu.brand_string": "Apple M3 Max"}, mps=True, mlx="gpu",
    ))
    assert (p.os, p.arch, p.chip) == ("darwin", "arm64", "Apple M3 Max")
    assert p.apple_silicon and p.unified_memory and p.mps
    assert p.mlx_device == "gpu"
    assert [(a.kind, a.memory_bytes) for a in p.accelerators] == [("metal", 128 * GiB)]
    assert not p.has_cuda


def test_cuda_gpus_from_nvidia_smi():
    smi = "NVIDIA H100 80GB HBM3, 81559, 9.0\nNVIDIA GeForce GTX 1080, 8192, 6.1"
    p = HardwareProfile.detect(FakeProbe(machine="aarch64", nvidia_smi=smi))
    assert p.arch == "arm64"
    h100, gtx = p.cuda_devices
    assert h100.name == "NVIDIA H100 80GB HBM3" and h100.memory_bytes == 81559 * 1024**2
    assert h100.compute_capability == "9.0" and h100.bf16
    assert gtx.compute_capability == "6.1" and not gtx.bf16


def test_detection_never_fails_and_says_why():
    p = HardwareProfile.detect(FakeProbe(
        cores=RuntimeError("no /proc"), memory=PermissionError("denied"),
        nvidia_smi="garbage line without commas", mlx=ImportError("libmlx.so: cannot open"),
        cpu_model=OSError("unreadable"),
    ))
    assert p.cpu_cores == 1 and p.memory_bytes == 0 and p.accelerators == []
    assert p.chip == "unknown"
    text = "\n".join(p.notes)
    assert "cpu cores: RuntimeError: no /proc" in text
    assert "memory: PermissionError: denied" in text
    assert "mlx: ImportError: libmlx.so" in text


def test_missing_tools_are_reasons():
    p = HardwareProfile.detect(FakeProbe(nvidia_smi=None, mlx=None))
    assert any("no NVIDIA GPU" in n for n in p.notes)
    assert any("mlx not installed" in n for n in p.notes)


def test_real_detection_on_this_machine():
    p = HardwareProfile.detect()
    assert p.cpu_cores >= 1 and p.memory_bytes > 0
    assert p.os in ("linux", "darwin", "windows")


def test_profiles_are_plain_serialisable_data():
    for name, profile in examples().items():
        again = HardwareProfile.model_validate(json.loads(profile.model_dump_json()))
        assert again == profile, name
    cluster = examples()["4x-h100-80gb"]
    assert len(cluster.cuda_devices) == 4 and all(a.bf16 for a in cluster.cuda_devices)


def test_threads_default_to_physical_cores_and_obey_the_env(monkeypatch):
    import psutil
    import pytest

    from localforge.errors import ConfigError
    from localforge.hardware import default_threads

    monkeypatch.delenv("LOCALFORGE_THREADS", raising=False)
    assert default_threads() == (psutil.cpu_count(logical=False) or 1)
    monkeypatch.setenv("LOCALFORGE_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.setenv("LOCALFORGE_THREADS", "two")
    with pytest.raises(ConfigError, match="LOCALFORGE_THREADS must be a whole number, got 'two'"):
        default_threads()


def test_cpu_bf16_from_the_cpu_flags():
    """AMX-BF16 or AVX512-BF16 on x86, BF16 on Arm: the planner trains bf16 there; other flags: not."""
    for flags, expected in (({"avx2", "avx512f", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True),
                            ({"fp", "asimd", "bf16"}, True), ({"avx2", "avx512f"}, False), (set(), False)):
        assert HardwareProfile.detect(FakeProbe(cpu_flags=flags)).cpu_bf16 is expected, flags
    broken = HardwareProfile.detect(FakeProbe(cpu_flags=OSError("no /proc")))
    assert not broken.cpu_bf16 and any(n.startswith("cpu flags") for n in broken.notes)


def test_the_real_cpu_flags_are_read_here():
    """On this Linux machine the flags come from /proc/cpuinfo (the same line `lscpu` reads)."""
    from pathlib import Path

    text = Path("/proc/cpuinfo").read_text()
    line = next(ln for ln in text.splitlines() if ln.split(":", 1)[0].strip() in ("flags", "Features"))
    assert Probe().cpu_flags() == set(line.split(":", 1)[1].split())
