"""Several training processes through accelerate: ``accelerate launch -m WORKER RUN_DIR``.

accelerate starts the processes (torchrun underneath) and each one runs ``train`` on the same
run folder through the worker module the caller names (the CLI's renders progress); an engine
that trains in several processes joins them (the torch engine wraps its model in DDP: gloo on
CPU, NCCL on CUDA). An accelerate config file (``accelerate config``) brings FSDP or DeepSpeed
and multi-node settings; the flags here cover the common cases without one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from localforge.errors import ConfigError, LocalforgeError


@dataclass
class Launch:
    processes: int  # in all, over every machine (accelerate's --num_processes)
    machines: int = 1
    machine_rank: int = 0
    main_ip: str | None = None
    main_port: int | None = None
    accelerate_config: str | None = None

    def command(self, run_dir: Path, worker: str, progress: bool) -> list[str]:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(self.processes),
               "--num_machines", str(self.machines), "--machine_rank", str(self.machine_rank)]
        if self.accelerate_config:
            cmd += ["--config_file", self.accelerate_config]
        else:
            cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if self.main_ip:
            cmd += ["--main_process_ip", self.main_ip]
        if self.main_port:
            cmd += ["--main_process_port", str(self.main_port)]
        cmd += ["-m", worker, str(run_dir)] + ([] if progress else ["--no-progress"])
        return cmd


def launch_processes(run_dir: Path, spec: Launch, worker: str, progress: bool = True) -> None:
    """Run ``python -m WORKER RUN_DIR`` in ``spec.processes`` processes; raise when they fail."""
    from importlib.util import find_spec

    from localforge.hardware import default_threads

    if find_spec("accelerate") is None:
        raise ConfigError("several processes need accelerate: pip install 'localforge[torch]'")
    if spec.accelerate_config and not Path(spec.accelerate_config).is_file():
        raise ConfigError(f"accelerate config {spec.accelerate_config}: no such file")
    env = dict(os.environ)
    local = max(1, spec.processes // spec.machines)
    # processes on one CPU share its cores
    env.setdefault("LOCALFORGE_THREADS", str(max(1, default_threads() // local)))
    env.setdefault("OMP_NUM_THREADS", env["LOCALFORGE_THREADS"])
    code = subprocess.call(spec.command(run_dir, worker, progress), env=env)
    if code == 130:
        from localforge.finetune.run import TrainingInterrupted

        raise TrainingInterrupted(f"stopped; checkpoint saved: continue with `localforge finetune resume {run_dir}`")
    if code != 0:
        raise LocalforgeError(f"the {spec.processes} training processes failed (exit {code}): see their output above")
