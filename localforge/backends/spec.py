"""What an engine says about itself, as plain data: one ``EngineSpec`` per backend name.

Every engine folder or module declares its spec (``SPECS``) next to its code; the registry
(``registry.py``) reads them, and everything else asks the registry: ``get_backend`` and
``auto``, the fine-tuning config and planner, ``doctor``, the run manifest. Declaring a spec
imports nothing, so reading every spec costs no engine import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1024**2
DEVICES = ("cuda", "metal", "mps", "cpu")  # what a HardwareProfile can offer (see hardware.py)


@dataclass(frozen=True)
class KernelSet:
    """Kernels an engine can train with beyond its own (config ``kernels``), from a package of
    their own: where they run, and for which model types (``config.json``'s ``model_type``)."""

    requires: str  # the import name
    package: str  # its distribution, as pip names it
    extra: str  # the localforge extra that installs it
    devices: tuple[str, ...]
    model_types: frozenset[str]
    replaces: str  # for people: what it takes over

    @property
    def install(self) -> str:
        """What to run where it is missing."""
        return f"pip install 'localforge[{self.extra}]'"


@dataclass(frozen=True)
class EngineSpec:
    name: str  # what --backend takes
    label: str  # how people write it in a sentence: "MLX", "llama.cpp"
    generate: str  # "module:Class" of its Backend (generation)
    requires: tuple[str, ...]  # import names that must be installed for it to run
    extra: str  # the pip extra that installs them ("" for the core install)
    runs_on: str  # for people: doctor and the README's table
    devices: tuple[str, ...] = ("cpu",)  # where it runs, best first (cuda, metal, mps, cpu)
    formats: tuple[str, ...] = ("hf", "gguf")  # the model files it loads (a GGUF converts to HF)
    server: bool = False  # talks to a server: ``auto`` takes it only when one answers
    model_prefix: str | None = None  # a model reference with this prefix is its own (``ollama:TAG``): auto picks it
    prefers: tuple[str, ...] = ()  # accelerators on which ``auto`` picks it first
    rank: int = 50  # order among engines ``auto`` could pick alike (lower first)
    adapters: bool = False  # generation loads a LoRA adapter (mlx-lm or PEFT folder)
    fuse: str | None = None  # "module:function" that merges an adapter into its base model
    # training
    trainer: str | None = None  # "module:Class" of its Trainer (see training.py); None: it does not train
    methods: tuple[str, ...] = ()  # what it trains: lora, dora, full
    multi_process: bool = False  # trains in several processes (accelerate launch)
    # per method: import names it needs beyond ``requires`` (grpo on mlx: mlx_lm_lora), and the
    # distributions a run of that method records in its manifest
    method_requires: dict[str, tuple[str, ...]] = field(default_factory=dict)
    method_packages: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # trains in bf16 autocast with fp32 trainable weights on a CPU with bf16 instructions, so
    # ``dtype: auto`` plans bf16 there (see planner._dtype)
    cpu_bf16: bool = False
    # keeps packed sequences apart exactly for every model it trains, so ``packing: auto`` packs
    exact_packing: bool = False
    # takes the loss over the output head in chunks of ``training.chunk_rows`` tokens, so no step
    # holds the logits of more (the planner counts one chunk's)
    chunked_loss: bool = False
    # kernel sets a config can ask for by name (``kernels: liger``); its own are ``native``
    kernels: dict[str, KernelSet] = field(default_factory=dict)
    # devices on which ``compile: true`` compiles each decoder layer (torch.compile)
    compiles: tuple[str, ...] = ()
    grpo_reference_copy: bool = False  # GRPO's KL reference is a second copy of the weights even for LoRA
    runtime_bytes: dict[str, int] = field(default_factory=dict)  # per device: memory the runtime holds
    packages: tuple[str, ...] = ()  # distributions whose versions a run manifest records
    # per OS ("linux", "darwin", as hardware.HardwareProfile.os): what users should know before
    # picking it there; doctor shows it and a command that runs the engine says it once
    caveats: dict[str, str] = field(default_factory=dict)

    @property
    def trains(self) -> bool:
        return self.trainer is not None
