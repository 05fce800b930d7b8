"""The start of an FSDP2 run, without the whole model on any device.

Every rank builds the model as it trains (the method's adapters on the base) without weights, on
the meta device; the fast paths are installed on it as on a loaded model, and it is sharded. Rank 0
alone loads the base, into host memory, makes it trainable as one process would (the same seeded
adapter initialisation, DoRA's magnitudes from the base weights) and broadcasts its weights into the
ranks' shards and its buffers (rotary frequencies) to them. So each device holds its shard only,
and a base larger than one device can train.

Rank 0 keeps that whole model for what one process scores before training (test answers, the
general probe), moved to its device only where it fits beside the shard (not run on GPUs)."""
from __future__ import annotations

import torch

from ..methods.common import model_bytes
from ..progress import say
from . import distributed
from .loss import label_loss_sum
from .sharded_end import free_bytes, no_room


def skeleton(cfg, method, dtype: torch.dtype):
    """The model as trained, without weights (on the meta device)."""
    from ..models.load import load_skeleton

    return method.make_trainable(load_skeleton(cfg.model.name, dtype, cfg.model.trust_remote_code), cfg.adapter)


def load_weights(model, cfg, method, dtype: torch.dtype, device: torch.device, ranks: distributed.Ranks):
    """Shards `model` (the skeleton, fast paths installed) and fills the shards with rank 0's weights;
    returns (the sharded root module, rank 0's whole model in host memory or None on other ranks).
    Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    whole = None
    if ranks.main:
        whole = method.load_base(cfg.model.name, dtype, torch.device("cpu"), cfg.model.trust_remote_code)
        torch.manual_seed(cfg.train.seed)
        whole = method.make_trainable(whole, cfg.adapter)
    # the base's evaluation computes the label loss; training sets the run's
    root = distributed.shard_at_load(model, label_loss_sum, ranks, device, cfg.train.fsdp_offload)
    # Offloaded shards live in host memory between uses (FSDP2's CPUOffloadPolicy expects them there).
    root.to_empty(device="cpu" if cfg.train.fsdp_offload else device)
    state = {f"model.{name}": value for name, value in whole.state_dict().items()} if whole is not None else {}
    set_model_state_dict(root, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers are not sharded and non-persistent ones (rotary frequencies) are in no state dict: sent
    # whole, after the weights (on the run's device beside offloaded shards, torch's loading would
    # find two devices in the model).
    buffers = ranks.broadcast(dict(whole.named_buffers()) if whole is not None else None)
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value.to(device)
    return root, whole


def for_scoring(whole, device: torch.device, fast_paths: str):
    """Rank 0's whole model on its device for the base's scores, or (None, why: said) where it takes
    more than its share of the memory free beside the shard."""
    from .. import accel

    why = no_room(model_bytes(whole), free_bytes(device), device)
    if why:
        say(f"the base is not scored on test answers or the general probe here: {why}")
        return None, why
    whole = whole.to(device)
    accel.apply(whole, device, fast_paths)  # scored through the fast paths, as the fine-tuned model will be
    return whole, None
