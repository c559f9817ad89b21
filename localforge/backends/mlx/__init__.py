"""mlx-lm: generation (``generate.py``) and the training engine on mlx-lm's tuner (``train.py``).
This file only declares the engine."""

from localforge.backends.spec import EngineSpec, MiB

SPECS = (
    EngineSpec(
        name="mlx", label="MLX", extra="mlx", runs_on="Apple Silicon (Metal); Linux CPU via mlx[cpu]",
        generate="localforge.backends.mlx.generate:MLXBackend", requires=("mlx", "mlx_lm"),
        devices=("metal", "cpu"), prefers=("metal",), rank=3, adapters=True,
        trainer="localforge.backends.mlx.train:MLXTrainer", methods=("lora", "dora", "full", "grpo"),
        multi_process=False,
        # GRPO through mlx-lm-lora's sampler and objective (Python >= 3.11)
        method_requires={"grpo": ("mlx_lm_lora",)}, method_packages={"grpo": ("mlx-lm-lora",)},
        grpo_reference_copy=True,
        runtime_bytes={"metal": 300 * MiB, "cpu": 455 * MiB},
        packages=("mlx", "mlx-lm", "numpy"),
        caveats={"linux": "MLX on a Linux CPU (mlx[cpu]) is slow: about 10x slower generation than torch "
                          "(1.6 vs 15.9 tok/s) and about 40x slower training on a 2-core x86 machine; it is "
                          "for checking MLX code paths, use --backend torch or llamacpp for real work"},
    ),
)
