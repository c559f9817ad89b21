"""The hardware profile: detected once, passed down as plain data.

``HardwareProfile.detect()`` never fails: what it cannot find becomes a reason in ``notes``.
Profiles can also be built by hand (see ``examples()``) so planners can be tested against
machines we do not have.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib.util import find_spec

from pydantic import BaseModel, Field

GiB = 1024**3


class Accelerator(BaseModel):
    kind: str  # "cuda", "metal", "mps"
    name: str
    memory_bytes: int
    compute_capability: str | None = None  # "9.0" for CUDA devices
    bf16: bool = False


class HardwareProfile(BaseModel):
    os: str  # "linux", "darwin", "windows"
    arch: str  # "x86_64", "arm64"
    chip: str  # "Apple M3 Max", "Intel(R) Xeon(R) ..." or "unknown"
    cpu_cores: int
    memory_bytes: int
    available_memory_bytes: int
    apple_silicon: bool = False
    unified_memory: bool = False  # CPU and GPU share memory (Apple Silicon)
    mlx_device: str | None = None  # "gpu" (Metal), "cpu", or None when mlx is absent
    mps: bool = False  # torch's Metal backend
    cpu_bf16: bool = False  # the CPU has bf16 matmul instructions (AMX-BF16, AVX512-BF16; Arm's BF16)
    accelerators: list[Accelerator] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)  # what could not be detected, and why

    @property
    def cuda_devices(self) -> list[Accelerator]:
        return [a for a in self.accelerators if a.kind == "cuda"]

    @property
    def has_cuda(self) -> bool:
        return bool(self.cuda_devices)

    @property
    def devices(self) -> tuple[str, ...]:
        """Where an engine can run here, best first: cuda, metal (the Apple GPU), mps, cpu."""
        kinds = {a.kind for a in self.accelerators}
        offered = (("cuda", "cuda" in kinds), ("metal", "metal" in kinds), ("mps", self.mps), ("cpu", True))
        return tuple(d for d, ok in offered if ok)

    @classmethod
    def detect(cls, probe: Probe | None = None) -> HardwareProfile:
        return _detect(probe or Probe())


class Probe:
    """The platform facts detection reads; tests subclass it to fake a machine."""

    def system(self) -> str:
        return platform.system()

    def machine(self) -> str:
        return platform.machine()

    def cpu_cores(self) -> int:
        return os.cpu_count() or 1

    def memory(self) -> tuple[int, int]:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)

    def sysctl(self, key: str) -> str | None:
        return run_tool(["sysctl", "-n", key])

    def cpu_model(self) -> str | None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            return None
        return None

    def cpu_flags(self) -> set[str]:
        """The CPU's feature flags: /proc/cpuinfo's ``flags`` (x86) or ``Features`` (Arm) on Linux,
        the ``hw.optional.arm.FEAT_*`` sysctls that are set on macOS."""
        if self.system() == "Darwin":
            return {"bf16"} if self.sysctl("hw.optional.arm.FEAT_BF16") == "1" else set()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                for line in fh:
                    key = line.split(":", 1)[0].strip()
                    if key in ("flags", "Features"):
                        return set(line.split(":", 1)[1].split())
        except OSError:
            return set()
        return set()

    def nvidia_smi(self) -> str | None:
        """CSV rows ``name, memory MiB, compute capability`` or None when there is no tool."""
        if not shutil.which("nvidia-smi"):
            return None
        return run_tool(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,compute_cap",
                "--format=csv,noheader,nounits",
            ]
        )

    def torch_mps(self) -> bool | None:
        """Whether torch sees MPS; None when torch is not installed."""
        if find_spec("torch") is None:
            return None
        import torch

        return bool(torch.backends.mps.is_available())

    def mlx_device(self) -> str | None:
        """"gpu" or "cpu" as mlx reports its default device; None when mlx is not installed."""
        if find_spec("mlx") is None:
            return None
        import mlx.core as mx

        return "gpu" if mx.default_device() == mx.gpu else "cpu"


def default_threads() -> int:
    """CPU threads for in-process engines: ``$LOCALFORGE_THREADS``, else the physical cores.

    Measured on a 2-core VM with SmolLM2-135M: torch 26.7 tok/s with 2 threads vs 16.3 with 1
    when idle, but 6.3 vs 16.3 when another process keeps one core busy; set
    LOCALFORGE_THREADS=1 on a small machine that is doing other work.
    """
    env = os.environ.get("LOCALFORGE_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            from localforge.errors import ConfigError

            raise ConfigError(f"LOCALFORGE_THREADS must be a whole number, got '{env}'") from None
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})  # x86 AMX, x86 AVX-512, Arm (Linux and macOS)


def run_tool(cmd: list[str]) -> str | None:
    """A command's stripped output, or None when it is missing, fails, or says nothing (10 s at most)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _safely(notes: list[str], what: str, fn, default=None):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - detection reports, it never raises
        notes.append(f"{what}: {type(exc).__name__}: {exc}".splitlines()[0])
        return default


def _parse_nvidia_smi(text: str) -> list[Accelerator]:
    gpus = []
    for row in text.splitlines():
        parts = [p.strip() for p in row.split(",")]
        if len(parts) < 3:
            continue
        name, mem_mib, cc = parts[0], parts[1], parts[2]
        try:
            major = int(cc.split(".")[0])
        except ValueError:
            major = 0
        gpus.append(
            Accelerator(
                kind="cuda",
                name=name,
                memory_bytes=int(float(mem_mib)) * 1024**2 if mem_mib.replace(".", "").isdigit() else 0,
                compute_capability=cc or None,
                bf16=major >= 8,  # Ampere and newer
            )
        )
    return gpus


def _detect(probe: Probe) -> HardwareProfile:
    notes: list[str] = []
    system = _safely(notes, "os", probe.system, "unknown").lower()
    arch = _safely(notes, "arch", probe.machine, "unknown").lower()
    arch = {"aarch64": "arm64", "amd64": "x86_64"}.get(arch, arch)
    cores = _safely(notes, "cpu cores", probe.cpu_cores, 1)
    total, available = _safely(notes, "memory", probe.memory, (0, 0))

    apple_silicon = system == "darwin" and arch == "arm64"
    if system == "darwin":
        chip = _safely(notes, "chip", lambda: probe.sysctl("machdep.cpu.brand_string"))
    else:
        chip = _safely(notes, "chip", probe.cpu_model)

    accelerators: list[Accelerator] = []
    mps = False
    if apple_silicon:
        # Metal shares the machine's memory: report it as one accelerator with that memory.
        accelerators.append(Accelerator(kind="metal", name=chip or "Apple GPU", memory_bytes=total))
        mps = bool(_safely(notes, "torch mps", probe.torch_mps, False))
    else:
        smi = _safely(notes, "nvidia-smi", probe.nvidia_smi)
        if smi:
            accelerators.extend(_safely(notes, "nvidia-smi output", lambda: _parse_nvidia_smi(smi), []))
        else:
            notes.append("no NVIDIA GPU: nvidia-smi not found or found no device")

    cpu_bf16 = bool(_safely(notes, "cpu flags", lambda: BF16_FLAGS & set(probe.cpu_flags()), set()))

    mlx_device = _safely(notes, "mlx", probe.mlx_device)
    if mlx_device is None:
        notes.append("mlx not installed (pip install 'localforge[mlx]')")

    return HardwareProfile(
        os=system,
        arch=arch,
        chip=chip or "unknown",
        cpu_cores=int(cores),
        memory_bytes=int(total),
        available_memory_bytes=int(available),
        apple_silicon=apple_silicon,
        unified_memory=apple_silicon,
        mlx_device=mlx_device,
        mps=mps,
        cpu_bf16=cpu_bf16,
        accelerators=accelerators,
        notes=notes,
    )


def examples() -> dict[str, HardwareProfile]:
    """Hand-built profiles of machines we test planners against but may not have."""
    m3 = HardwareProfile(
        os="darwin", arch="arm64", chip="Apple M3 Max", cpu_cores=16,
        memory_bytes=128 * GiB, available_memory_bytes=110 * GiB,
        apple_silicon=True, unified_memory=True, mlx_device="gpu", mps=True, cpu_bf16=True,
        accelerators=[Accelerator(kind="metal", name="Apple M3 Max", memory_bytes=128 * GiB)],
    )
    h100 = Accelerator(kind="cuda", name="NVIDIA H100 80GB HBM3", memory_bytes=80 * GiB,
                       compute_capability="9.0", bf16=True)
    cluster = HardwareProfile(
        os="linux", arch="x86_64", chip="AMD EPYC 9654", cpu_cores=192,
        memory_bytes=2048 * GiB, available_memory_bytes=1900 * GiB,
        accelerators=[h100.model_copy() for _ in range(4)],
    )
    one_h100 = HardwareProfile(
        os="linux", arch="x86_64", chip="Intel(R) Xeon(R) Platinum 8480+", cpu_cores=26,
        memory_bytes=256 * GiB, available_memory_bytes=240 * GiB, accelerators=[h100.model_copy()],
    )
    laptop = HardwareProfile(
        os="linux", arch="x86_64", chip="Intel(R) Core(TM) i7-1165G7", cpu_cores=8,
        memory_bytes=16 * GiB, available_memory_bytes=10 * GiB,
    )
    xeon = HardwareProfile(
        os="linux", arch="x86_64", chip="Intel(R) Xeon(R) Platinum 8481C", cpu_cores=8,
        memory_bytes=32 * GiB, available_memory_bytes=28 * GiB, cpu_bf16=True,
    )
    return {"m3-max-128gb": m3, "1x-h100-80gb": one_h100, "4x-h100-80gb": cluster, "cpu-laptop-16gb": laptop,
            "cpu-xeon-bf16-32gb": xeon}
