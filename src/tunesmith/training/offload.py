"""Checkpointed activations in host memory (`adapter.offload_activations`).

With gradient checkpointing, what a step keeps on the GPU between forward and backward is each
decoder block's input: layers x tokens x hidden values (1 GiB for Llama-3.1-8B at 2 x 2048 tokens in
bf16, an eighth of a QLoRA run's peak). Offloaded, each is copied to pinned host memory when
the forward saves it and back when the backward needs it, one block at a time.

Both copies are queued on the compute stream without waiting (`non_blocking`): the host is not
synchronised (training/loop.py reads the device once per step), and stream order makes them safe:
the GPU memory of a saved tensor is reused only by work queued after its copy out, and the copy
back is queued before the backward that reads it. They are not overlapped with compute, so each
micro-batch spends about twice the block inputs' bytes over the host link (tens of ms per GiB).

Applies to CUDA tensors of at least a MiB that are not parameters; elsewhere (the CPU) it changes
nothing. Under checkpointing those are the blocks' inputs: torch's non-reentrant checkpoint saves
them outside its own hooks, so these hooks see them, and nothing saved inside a block.
"""
from __future__ import annotations

import contextlib

import torch

MIN_BYTES = 1 << 20  # smaller tensors (position ids, norms' statistics) are not worth a copy


class HostActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of the `devices` types copied to host memory in the forward, back in the backward."""

    def __init__(self, devices: tuple[str, ...] = ("cuda",), min_bytes: int = MIN_BYTES):
        self.offloaded_bytes = 0  # what the last forwards moved out, for the tests and the records

        def pack(tensor: torch.Tensor):
            size = tensor.numel() * tensor.element_size()
            if tensor.device.type not in devices or size < min_bytes or isinstance(tensor, torch.nn.Parameter):
                return tensor
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                               pin_memory=tensor.device.type == "cuda")
            host.copy_(tensor, non_blocking=True)
            self.offloaded_bytes += size
            return tensor.device, host

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def offloaded(loss_fn, enabled: bool):
    """`loss_fn(model, batch)` whose forward saves its large tensors in host memory, where enabled."""
    if not enabled:
        return loss_fn

    def run(model, batch):
        with HostActivations() if torch.is_grad_enabled() else contextlib.nullcontext():
            return loss_fn(model, batch)

    return run
