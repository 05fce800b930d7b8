"""Gradient checkpointing of the first k decoder blocks; with `adapter.gradient_checkpointing: auto`,
k chosen from the run's plan.

A checkpointed block keeps only its input for the backward pass and runs its forward again there:
less memory, about a third more compute for that block. Checkpointing all or nothing leaves a
GPU either idle in recomputation or out of memory; here the first k blocks are checkpointed
(transformers' per-block flag) and the others keep their activations, and 'auto' takes the
fewest k with which the planned peak (plan/run.py: the run's real micro-batches) stays within
HEADROOM of the memory the device has for the run. A run that fits checkpoints nothing. The
losses do not depend on k: a recomputed forward is the same forward (non-reentrant
checkpointing replays the RNG state, so dropout masks repeat).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Share of the free memory the planned peak may take: the plan came within 1% of the allocated
# peak on an H200 and within 3-18% on this CPU (bench/RESULTS.md); the rest is for the caching
# allocator's fragmentation and what other processes start meanwhile.
HEADROOM = 0.9


@dataclass(frozen=True)
class Checkpointing:
    blocks: int  # checkpointed, from the first
    of: int  # decoder blocks of the model
    setting: bool | int | str  # adapter.gradient_checkpointing
    line: str | None = None  # what to tell the user ('auto' only)

    def record(self) -> dict:
        return {"blocks": self.blocks, "of": self.of, "setting": self.setting}


def decoder_blocks(model) -> list:
    """The model's blocks that transformers can checkpoint one by one, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_first(model, count: int) -> None:
    """Checkpoint the first `count` decoder blocks (non-reentrant), the others not."""
    if count <= 0:
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "peft_config"):  # as methods/common.py add_lora: the first block's input needs a grad path
        model.enable_input_require_grads()
    for block in decoder_blocks(model)[count:]:
        block.gradient_checkpointing = False


def memory_for_run(device: torch.device, baseline: float) -> float:
    """Bytes the run may reach at its peak, counted as the plan counts them: on a GPU what is free
    plus what PyTorch's allocator holds for this process already (the loaded weights); on the CPU
    the memory available, shared among the processes of this machine, plus what the process has
    grown by since `baseline` (its resident memory before loading the model)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device))
    import psutil

    from ..plan.devices import resident

    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return psutil.virtual_memory().available / processes + max(0.0, resident("VmRSS") - baseline)


def choose(cfg, model, train_split, layout: str, device: torch.device, baseline: float, ranks) -> Checkpointing:
    """How many blocks the run checkpoints; with 'auto', checkpoint them now (under torchrun the
    most any rank needs, so every rank runs alike)."""
    from ..plan import checkpoint_layers_within, gib

    setting = cfg.adapter.gradient_checkpointing
    blocks = len(decoder_blocks(model)) or model.config.num_hidden_layers
    if setting is True or setting is False:  # the method has set it up already
        return Checkpointing(blocks if setting else 0, blocks, setting)
    if setting != "auto":  # the first k blocks
        count = min(setting, blocks) if decoder_blocks(model) or not setting else blocks
        checkpoint_first(model, count)
        return Checkpointing(count, blocks, setting, f"gradient checkpointing: {count} of {blocks} blocks")
    if ranks.fsdp:
        checkpoint_first(model, blocks)  # the plan counts one device's memory, not FSDP's shards
        return Checkpointing(blocks, blocks, setting, "gradient checkpointing: auto: every block (under FSDP)")
    budget = HEADROOM * memory_for_run(device, baseline)
    try:
        fewest, _ = checkpoint_layers_within(cfg, train_split, layout, device, budget)
        why = (f"the planned peak within {gib(budget)}, {HEADROOM:.0%} of the memory free for it"
               if fewest is not None else f"even so the planned peak is above {gib(budget)}")
    except Exception as err:  # noqa: BLE001 (an estimate that fails never stops a run)
        fewest, why = None, f"no plan ({type(err).__name__}: {err})"
    count = blocks if fewest is None or (fewest and not decoder_blocks(model)) else min(fewest, blocks)
    count = int(ranks.most(count))
    checkpoint_first(model, count)
    return Checkpointing(count, blocks, setting, f"gradient checkpointing: auto: {count} of {blocks} blocks ({why})")
