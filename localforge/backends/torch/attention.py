"""Attention for packed rows: every sequence attends to itself alone, with no dense mask.

transformers reads packing off position ids and builds a block-diagonal ``[B, 1, T, T]`` mask
for SDPA, which then runs its masked kernels over every pair of tokens in a row, the pairs the
mask throws away included: on a CPU that is 1.4-2.2x the time of attending per sequence, and on
CUDA the mask rules out the FlashAttention kernel. So the torch trainer registers one more
attention implementation with transformers (``NAME``), which the model runs instead of "sdpa":

- a batch with sequence bounds (``cu_seq_lens_q``, cumulative over the flattened ``B*T`` tokens,
  each row's padding a sequence of its own) and no cache: on a CPU, rows of at least
  ``CPU_PER_SEQUENCE_FROM`` tokens attend by causal SDPA sequence by sequence, each on its own
  slice, so no masked pair is computed; on CUDA in bf16/fp16, FlashAttention's variable-length
  kernel (``torch.nn.attention.varlen``) over the flattened tokens;
- anything else (padded rows, generation, shorter rows on a CPU, a GPU, dtype or torch the
  kernel lacks): transformers' own SDPA path with the mask it built, unchanged.

Both are exact: a token sees the same keys as under the block-diagonal mask.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import numpy as np
import torch

NAME = "localforge_packed"
# On a CPU attending per sequence pays once rows are long; below, the masked kernels are as fast
# or faster (benchmarks/attention.py, SmolLM2-135M LoRA, fp32, 2 threads: per sequence over
# masked 0.81x at 256 tokens, 0.97x at 512, 1.10x at 1024, 1.70x at 2048 on an Intel Xeon with
# AVX-512; 1.05x, 1.02x and 1.71x at 256, 512 and 2048 on an AMD EPYC with AVX2)
CPU_PER_SEQUENCE_FROM = 1024


def register() -> None:
    """Make ``NAME`` an attention implementation transformers knows, with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed_attention(model) -> bool:
    """Switch a model that runs transformers' SDPA to ``NAME``; True when it did."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True


def sequence_bounds(segment_ids: np.ndarray, device) -> dict:
    """The model's keyword arguments that give a packed batch's sequences: where each starts and
    ends in the flattened ``B*T`` tokens (a change of segment id, or a new row, starts one; each
    row's padding is one more) and the longest, as transformers' packed (flash) kwargs name them."""
    rows, width = segment_ids.shape
    starts = np.ones_like(segment_ids, dtype=bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    cu = np.append(np.flatnonzero(starts.reshape(-1)), rows * width).astype(np.int32)
    longest = int(np.diff(cu).max())
    cu = torch.from_numpy(cu).to(device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: ``query`` [B, H, T, D], ``key``/``value`` [B, Hkv, T, D];
    returns ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[2] != key.shape[2] or query.shape[2] == 1:  # not packed, or decoding
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if not query.is_cuda and query.shape[2] >= CPU_PER_SEQUENCE_FROM:
        return _per_sequence(query, key, value, cu, dropout, scaling), None
    if query.is_cuda:
        out = _flash_varlen_or_none(query, key, value, cu, kwargs["max_length_q"], dropout, scaling)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)  # short CPU rows, or a GPU or dtype FlashAttention lacks: masked


def flash_varlen_applies(query, dropout: float = 0.0, scaling: float | None = None) -> bool:
    """Whether FlashAttention's variable-length kernel takes this CUDA query: half precision, no
    dropout, a head size it has (a multiple of 8, at most 256), an Ampere or newer card, a torch
    that ships the kernel (and, where its kernel takes no ``scale``, the model's scale is the
    default one over the square root of the head size)."""
    dim = query.shape[-1]
    if not (query.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0 and dim % 8 == 0 and dim <= 256
            and torch.cuda.get_device_capability(query.device)[0] >= 8 and _varlen() is not None):
        return False
    return "scale" in _varlen()[1] or scaling is None or abs(scaling * dim**0.5 - 1.0) < 1e-6


# Both exact paths stay out of torch.compile's graphs (config ``compile``): one reads the bounds
# on the host, the other is a kernel of its own; the rest of each layer compiles around them.
@torch.compiler.disable
def _flash_varlen_or_none(query, key, value, cu, longest: int, dropout: float, scaling):
    """FlashAttention's variable-length output where its kernel takes this query, else None."""
    if not flash_varlen_applies(query, dropout, scaling):
        return None
    return _flash_varlen(query, key, value, cu, longest, scaling)


@torch.compiler.disable
def _per_sequence(query, key, value, cu, dropout: float, scaling):
    """Causal SDPA on each sequence's own slice, the rows put back together."""
    cu = cu.tolist()
    batch, heads, width, dim = query.shape
    gqa = key.shape[1] != heads
    rows = [[] for _ in range(batch)]
    for start, end in zip(cu[:-1], cu[1:], strict=True):
        row, lo = divmod(start, width)
        hi = end - row * width
        rows[row].append(torch.nn.functional.scaled_dot_product_attention(
            query[row:row + 1, :, lo:hi], key[row:row + 1, :, lo:hi], value[row:row + 1, :, lo:hi],
            dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa))
    out = torch.cat([torch.cat(parts, dim=2) if len(parts) > 1 else parts[0] for parts in rows], dim=0)
    return out.transpose(1, 2).contiguous()


def _flash_varlen(query, key, value, cu, longest: int, scaling):
    """FlashAttention's variable-length kernel over the flattened tokens (CUDA, half precision)."""
    fn, params = _varlen()
    batch, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * width, heads, dim)
    if kv_heads != heads and "enable_gqa" not in params:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    k = key.transpose(1, 2).reshape(batch * width, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * width, value.shape[1], dim)
    extra = {"scale": scaling} if "scale" in params else {}
    if "window_size" in params:  # its signature changed across torch releases
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    if key.shape[1] != heads:
        extra["enable_gqa"] = True
    out = fn(q, k, v, cu, cu, longest, longest, **extra)
    return out.view(batch, width, heads, dim)


@lru_cache(maxsize=1)
def _varlen():
    """torch's variable-length FlashAttention and the names of its parameters, or None (an older torch)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = frozenset(inspect.signature(varlen_attn).parameters)
    return (varlen_attn, params) if params & {"window_size", "is_causal"} else None  # causal, or not at all
