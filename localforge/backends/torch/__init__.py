"""torch/transformers: generation (``generate.py``), the PEFT training engine (``train.py``) and
merging an adapter into its base (``fuse.py``). This file only declares the engine."""

import os

from localforge.backends.spec import EngineSpec, KernelSet, MiB

EXPANDABLE = "expandable_segments:True"


def prefer_expandable_segments() -> None:
    """Let torch's CUDA allocator grow segments in place instead of caching fixed blocks: the
    process holds close to what it allocates (measured on an H200: 29.6 GiB held instead of 51.6
    for the same run, at 4% less speed). Called before the engine imports torch; a value the user
    set (PYTORCH_CUDA_ALLOC_CONF or its newer name PYTORCH_ALLOC_CONF) is left alone."""
    if not any(os.environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE


SPECS = (
    EngineSpec(
        name="torch", label="torch", extra="torch", runs_on="CPU, CUDA, MPS",
        generate="localforge.backends.torch.generate:TorchBackend", requires=("torch", "transformers"),
        devices=("cuda", "mps", "cpu"), prefers=("cuda",), rank=2, adapters=True,
        fuse="localforge.backends.torch.fuse:fuse",
        trainer="localforge.backends.torch.train:TorchTrainer", methods=("lora", "dora", "full", "grpo"),
        method_requires={"grpo": ("trl",)}, method_packages={"grpo": ("trl",)},
        multi_process=True, cpu_bf16=True, exact_packing=True, chunked_loss=True,
        # Liger's Triton kernels for the architectures whose loss the trainer takes off the
        # decoder's hidden states (training.PLAIN_HEADS), where its fused linear cross-entropy
        # stands in for the chunked one
        kernels={"liger": KernelSet(
            requires="liger_kernel", package="liger-kernel", extra="cuda", devices=("cuda",),
            model_types=frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"}),
            replaces="RMSNorm, RoPE, SwiGLU and the loss over the output head")},
        compiles=("cuda", "cpu"),  # inductor: Triton on CUDA, a C++ compiler on a CPU
        # measured: the CPU runtime of a training process holds 455 MiB before the model loads
        runtime_bytes={"cpu": 455 * MiB, "cuda": 600 * MiB, "mps": 400 * MiB},
        packages=("torch", "transformers", "peft", "accelerate", "numpy"),
    ),
)
