"""Memory per device of a run spread over several devices (torchrun; `train.fsdp`).

DDP replicas (training/distributed.py wrap) hold the whole estimate each: their gradients are
reduced in place (gradient_as_bucket_view), so DDP adds no copy of them. FSDP2 (distributed.shard)
keeps on each of N devices a 1/N shard of every weight, gradient and optimizer state, and gathers
whole weights only around their use:
- each decoder block is a unit: its weights are gathered for its forward and again for its
  backward and freed after each; while one block computes, the next one's gather may be under way,
  so two blocks' weights at most, in the gathered dtype (bf16 on CUDA, MixedPrecisionPolicy; the
  stored dtype on the CPU);
- the root unit (embeddings, final norm, LM head) stays gathered from the start of the forward to
  the end of the backward (FSDP2 does not reshard the root after its forward), and so do its whole
  gradients where they train (a full fine-tune's);
- in the backward a block's whole gradients live until they are reduce-scattered (fp32 on CUDA),
  two blocks' at most.
Activations, the LM head's working memory and the framework's overhead are each device's own.
Checked in one process against FSDP2 with a fake two-rank group (tests/test_plan_sharding.py);
never on several GPUs.
"""
from __future__ import annotations

from dataclasses import replace

from .memory import Estimate, adapter_params, dtypes, weight_bytes
from .setup import BYTES, _method

IN_FLIGHT = 2  # blocks gathered (or whose gradients wait for their reduce-scatter) at once
SHARDED = ("weights", "adapter weights", "gradients", "optimizer states")


def gathered_bytes(est: Estimate, gpu: bool) -> tuple[float, float]:
    """(whole weights, whole gradients) one FSDP2 device holds beside its shards at the peak."""
    shape, setup = est.shape, est.setup
    full = _method(setup).trains_all_weights
    root = shape.embedding_params + shape.hidden
    stored = dtypes(setup).master if full else BYTES[setup.dtype]  # the root's weights as stored
    block_stored = (weight_bytes(shape, setup) - root * stored) / shape.layers
    adapters = adapter_params(shape, setup) / shape.layers
    if gpu:  # MixedPrecisionPolicy gathers floating weights in bf16 (4-bit codes stay as they are)
        quantized = _method(setup).quantized_base
        root_bytes = 2 * root
        block_bytes = (block_stored if quantized else 2 * shape.block_params) + 2 * adapters
    else:
        root_bytes = stored * root
        block_bytes = block_stored + BYTES[setup.adapter_dtype] * adapters
    weights = root_bytes + IN_FLIGHT * block_bytes
    if est.parts.get("gradients", 0.0) <= 0:  # the peak is not in the backward
        return weights, 0.0
    grad = 4 if gpu else dtypes(setup).master  # reduced in fp32 on CUDA, in the weights' dtype on the CPU
    head_trains = full and not (setup.freeze_embeddings and shape.tied)
    root_grads = shape.vocab * shape.hidden * (1 if shape.tied else 2) * grad if head_trains else 0.0
    return weights, root_grads + IN_FLIGHT * grad * (shape.block_params if full else adapters)


def per_device(est: Estimate, gpu: bool) -> Estimate:
    """The estimate for one of the run's devices (the estimate itself for one device or DDP)."""
    setup = est.setup
    if setup.devices <= 1 or not setup.fsdp:
        return est
    parts = {name: value / setup.devices if name in SHARDED else value for name, value in est.parts.items()}
    weights, gradients = gathered_bytes(est, gpu)
    parts["gathered weights (FSDP)"] = weights
    parts["gathered gradients (FSDP)"] = gradients
    if gpu and _method(setup).trains_all_weights:
        parts["autocast weight copies"] = 0.0  # gathered in bf16 already, freed after each block
    return replace(est, parts=parts)
