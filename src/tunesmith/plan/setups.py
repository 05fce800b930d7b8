"""From a run config to the plan's Setup, and a Setup's estimate on a device."""
from __future__ import annotations

from dataclasses import replace

from .devices import Device, cpu_overhead
from .memory import Estimate, estimate
from .objectives import objective_setup
from .setup import Setup
from .sharding import per_device
from .shapes import LINEARS, ModelShape


def estimate_on(shape: ModelShape, setup: Setup, device: Device) -> Estimate:
    """The estimate for one of the run's devices, including what it needs beyond the tensors."""
    if device.is_cpu:
        return estimate_for_machine(shape, setup)
    tensors = per_device(estimate(shape, setup), gpu=True)
    return replace(tensors, parts={**tensors.parts, "framework overhead": device.overhead(tensors.total)})


def estimate_for_machine(shape: ModelShape, setup: Setup) -> Estimate:
    """For a CPU run on this machine (no matmul benchmark needed): tunesmith's CPU attention
    (accel/cpu/attention.py; for bf16 where this processor and compiler can run it, the native
    kernel of accel/cpu/native.py) and the allocator's overhead (devices.cpu_overhead)."""
    import torch

    from ..accel.cpu import native
    from .memory import dtypes

    bf16 = setup.dtype == "bfloat16" and dtypes(setup).inner == 2  # q, k and v in bf16 (not QLoRA's fp32)
    setup = replace(setup, cpu_attention=True, offload_activations=False,  # a CUDA-only saving
                    native_attention=bf16 and native.supported(torch.bfloat16, shape.head_dim))
    return per_device(estimate(shape, setup, overhead=cpu_overhead(estimate(shape, setup))), gpu=False)


def fewest_checkpointed(shape: ModelShape, setup: Setup, fits) -> int | None:
    """The fewest leading blocks to checkpoint for `fits(setup)` to hold, 0 to all; None where
    checkpointing every block is not enough. Checkpointing the first k blocks keeps only their
    inputs: the fewer, the less the backward recomputes."""
    for layers in range(shape.layers + 1):
        if fits(replace(setup, gradient_checkpointing=layers > 0, checkpoint_layers=layers)):
            return layers
    return None


def setup_from_config(cfg, label_share: float = 1.0, device=None, devices: int = 1) -> Setup:
    """The Setup a tunesmith run config trains with (longest sequences: the worst case), on each of
    `devices` (torchrun's processes); without `device`, model.dtype: auto is left to each device."""
    from ..device import compute_dtype

    dtype = str(compute_dtype(cfg.model.dtype, device)).replace("torch.", "")
    targets = LINEARS if cfg.adapter.target_modules == "all-linear" else tuple(cfg.adapter.target_modules)
    setting = cfg.adapter.gradient_checkpointing  # true, false, the first k blocks or 'auto' (per device)
    blocks = setting if type(setting) is int else 0
    setup = Setup(method=cfg.adapter.method, dtype=dtype, batch=cfg.train.batch_size, seq=cfg.data.max_seq_len,
                  gradient_checkpointing=setting is True or blocks > 0, checkpoint_layers=blocks or None,
                  checkpointing_auto=setting == "auto",
                  r=cfg.adapter.r, targets=targets, label_share=label_share,
                  freeze_embeddings=cfg.adapter.freeze_embeddings, packed_rows=cfg.data.packing,
                  grad_accum=cfg.train.grad_accum, adapter_dtype=cfg.adapter.dtype,
                  offload_activations=cfg.adapter.offload_activations, devices=devices,
                  fsdp=cfg.train.fsdp and devices > 1, dtype_auto=cfg.model.dtype == "auto" and device is None)
    return objective_setup(cfg, setup)  # sequences per example, reference copy (issue 23)
