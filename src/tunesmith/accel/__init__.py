"""Fast paths: rewrites of what a training forward computes, one layer, chosen by the run's device.

The main flow calls `apply(model, device, setting)` once, after the method has made the model
trainable (so modules PEFT wraps are rewritten as themselves). Each rewrite is a module with a
NAME, the LIBRARIES whose insides it relies on (accel/compat.py) and `install(model) -> count`,
which replaces the forward of exactly the classes it knows (accel/families.py) and leaves every
other module alone. `fast_paths: off` runs plain transformers + peft: the reference the tests
compare the fast paths with.

- cpu/: padding-free attention from batched matmuls or a native AVX512-BF16 kernel;
- cuda/: padding-free variable-length flash attention;
- shared by both: compiled RMSNorm, SwiGLU and rotary embedding, and LoRA layers as one
  autograd function.
"""
from __future__ import annotations

import torch

from . import compat


def backend(device: torch.device):
    """The package of rewrites for a device type (cpu or cuda), or None for others."""
    if device.type == "cuda":
        from . import cuda

        return cuda
    if device.type == "cpu":
        from . import cpu

        return cpu
    return None


def apply(model, device: torch.device, setting: str = "auto") -> dict[str, int]:
    """Install the device's fast paths on `model`; returns {rewrite: modules rewritten}."""
    chosen = backend(device) if setting != "off" else None
    applied: dict[str, int] = {}
    for rewrite in chosen.REWRITES if chosen else ():
        if compat.usable(rewrite.NAME, rewrite.LIBRARIES):
            count = rewrite.install(model)
            if count:
                applied[rewrite.NAME] = count
    return applied


def padding_free(model) -> bool:
    """Whether the model's attention keeps the sequences of one row apart (a fast path's
    attention is installed) in a family whose layers pass it the row's bounds and mix positions
    nowhere else (families.PADDING_FREE_TYPES), so micro-batches can go as unpadded rows."""
    from .cpu import attention as cpu_attention
    from .cuda import attention as cuda_attention
    from .families import PADDING_FREE_TYPES

    config = model.config
    return (getattr(config, "_attn_implementation", None) in (cpu_attention.NAME, cuda_attention.NAME)
            and getattr(config, "model_type", None) in PADDING_FREE_TYPES)


def describe(applied: dict[str, int], setting: str, device: torch.device) -> str:
    """One line for the run's start: which path a training forward takes."""
    if setting == "off":
        return "fast paths: off (plain transformers + peft)"
    if not applied:
        return f"fast paths: none apply on {device.type} (an architecture they do not know): plain transformers + peft"
    return "fast paths: " + ", ".join(f"{name} x{count}" if count > 1 else name for name, count in applied.items())
