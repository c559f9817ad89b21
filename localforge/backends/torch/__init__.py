"""torch/transformers: generation (``generate.py``), the PEFT training engine (``train.py``) and
merging an adapter into its base (``fuse.py``). This file only declares the engine."""

from localforge.backends.spec import EngineSpec, MiB

SPECS = (
    EngineSpec(
        name="torch", label="torch", extra="torch", runs_on="CPU, CUDA, MPS",
        generate="localforge.backends.torch.generate:TorchBackend", requires=("torch", "transformers"),
        devices=("cuda", "mps", "cpu"), prefers=("cuda",), rank=2, adapters=True,
        fuse="localforge.backends.torch.fuse:fuse",
        trainer="localforge.backends.torch.train:TorchTrainer", methods=("lora", "dora", "full", "grpo"),
        method_requires={"grpo": ("trl",)}, method_packages={"grpo": ("trl",)},
        multi_process=True,
        # measured: the CPU runtime of a training process holds 455 MiB before the model loads
        runtime_bytes={"cpu": 455 * MiB, "cuda": 600 * MiB, "mps": 400 * MiB},
        packages=("torch", "transformers", "peft", "accelerate", "numpy"),
    ),
)
