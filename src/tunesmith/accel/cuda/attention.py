"""Padding-free attention on CUDA: the sequences of a row attend to themselves only, by
variable-length flash attention (flash-attn's `flash_attn_varlen_func` where installed, else
torch's own `torch.nn.attention.varlen.varlen_attn`), and by SDPA per sequence where neither runs
(fp32, an older torch, another device).

A padding-free row (data/collate.py `flat_batch`) is [1, T] tokens of several examples end to
end, their bounds as transformers' cu_seq_lens_q/_k with max_length_q/_k known on the host, so
the kernels need no host synchronisation. Anything else (padded eval batches, generation with a
cache) goes to transformers' SDPA.

Written against the kernels' documented interfaces. On one H200 with torch 2.11 (2026-12-04) the
Llama-3.1-8B shape trained with the fast paths on (which kernel ran was not recorded; without
flash-attn, kernel_name picks torch's varlen_attn there), and varlen_attn took grouped heads
unrepeated (bench/varlen_gqa_check.py); the test against fast_paths=off has not yet passed on a GPU.
"""
from __future__ import annotations

import functools
import inspect

import torch

from ..rows import bounds_list, per_sequence_sdpa

NAME = "tunesmith_varlen"
LIBRARIES = ("transformers",)


@functools.lru_cache(maxsize=None)
def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def kernel_name(device: torch.device, dtype: torch.dtype) -> str:
    """Which variable-length kernel runs for this device and dtype: 'flash-attn', 'torch-varlen' or 'sdpa'."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    if _flash_attn() is not None:
        return "flash-attn"
    return "torch-varlen" if _torch_varlen() is not None else "sdpa"


def varlen(q, k, v, cumulative, longest: int, scale: float, window: int | None):
    """q [T, H, D], k, v [T, Hkv, D], causal within each sequence of `cumulative` -> [T, H, D]."""
    name = kernel_name(q.device, q.dtype)
    left = window - 1 if window and window < longest else -1
    if name == "flash-attn":
        return _flash_attn()(q, k, v, cumulative, cumulative, longest, longest, 0.0, softmax_scale=scale,
                             causal=True, window_size=(left, -1) if left >= 0 else (-1, -1))
    if name == "torch-varlen":
        function = _torch_varlen()
        options = inspect.signature(function).parameters
        extra = {}
        # Grouped key/value heads go in unrepeated: the flash kernel under it takes them (seen on
        # an H200 with torch 2.11, which has no enable_gqa: output and gradients equal the
        # repeated call's), so no per-layer copy of keys and values.
        if q.shape[1] != k.shape[1] and "enable_gqa" in options:
            extra["enable_gqa"] = True
        if "window_size" in options:
            extra["window_size"] = (left, 0)
        else:
            extra["is_causal"] = True
        return function(q, k, v, cumulative, cumulative, longest, longest, scale=scale, **extra)
    return per_sequence_sdpa(q, k, v, bounds_list(cumulative), scale, window)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' attention-function interface: query [B, H, S, D], key/value [B, Hkv, S, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cumulative = kwargs.get("cu_seq_lens_q")
    row = (cumulative is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
           and getattr(module, "is_causal", True) and query.shape[1] % key.shape[1] == 0)
    if not row:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, D]
    window = kwargs.get("sliding_window")
    if dropout or kwargs.get("softcap") is not None:  # the row has no mask to give SDPA: one sequence at a time
        return per_sequence_sdpa(q, k, v, bounds_list(cumulative), scale, window, dropout).unsqueeze(0), None
    longest = kwargs.get("max_length_q") or int((cumulative[1:] - cumulative[:-1]).max())
    out = varlen(q, k, v, cumulative, int(longest), scale, window)
    return out.unsqueeze(0), None  # [1, T, H, D]: the layout the output projection reads


def install(model) -> int:
    """Use this attention for a CUDA model that runs SDPA; 1 if it was switched, else 0."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return 0
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return 1
