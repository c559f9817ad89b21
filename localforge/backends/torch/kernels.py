"""What the torch trainer runs besides torch's own kernels: Liger's (config ``kernels: liger``)
and torch.compile over each decoder layer (config ``compile: true``).

- Liger (``liger-kernel``, the ``[cuda]`` extra): its Triton RMSNorm, rotary embedding and SwiGLU
  go into the model before the adapter does (the adapter's layers are then called from Liger's
  MLP as they were from the model's), and the loss over the output head is its fused linear
  cross-entropy, which, like the trainer's chunked one, never holds the logits of every learned
  token. The rotary embedding is patched in transformers' module for the architecture, so it
  holds for every model of that type the process builds afterwards (a training process builds
  one); the norm and MLP classes are put back.
- torch.compile: each decoder layer is compiled in place (its weights, adapter and state-dict
  keys unchanged), so layers of one shape share one compiled graph. Attention over packed rows
  is left out of the graphs (``attention.py``'s exact paths read the sequences' bounds on the
  host), and everything between the matmuls (norms, rotary, activation, the adapter's additions)
  fuses. Shapes that change from batch to batch (the bucketed widths) recompile once each, then
  generalise.
"""

from __future__ import annotations

import sys

import torch

from localforge.errors import ConfigError

LIGER_PATCHES = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}  # the loss is called by the trainer itself
ROTARY = "apply_rotary_pos_emb"  # transformers' name for it in each architecture's module


def apply_liger(model) -> None:
    """Liger's kernels into ``model`` (a transformers model, before its adapter)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"config key 'kernels': the installed liger-kernel has no kernels for {model_type} "
                          f"models: set kernels: auto")
    # Liger patches the instance's norms and MLPs, and swaps the architecture module's classes and
    # rotary function; the classes go back, so a model built later in the process is transformers'
    # own, and the rotary function (which the attention of this model calls) stays
    modeling = sys.modules[type(model).__module__]
    before = dict(vars(modeling))
    _apply_liger_kernel_to_instance(model=model, **LIGER_PATCHES)
    for name, value in before.items():
        if name != ROTARY and vars(modeling).get(name) is not value:
            setattr(modeling, name, value)


def liger_linear_cross_entropy(hidden, weight, targets):
    """``cross_entropy(hidden @ weight.T, targets, reduction="sum")`` by Liger's fused kernel."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a (PEFT-wrapped) transformers model; [the decoder] where it has no ``layers``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) and len(layers) else [decoder]


def compile_layers(model) -> int:
    """torch.compile each decoder layer of ``model`` in place; how many it compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)
