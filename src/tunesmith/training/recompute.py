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

from ..plan.devices import HEADROOM


@dataclass(frozen=True)
class Checkpointing:
    blocks: int  # checkpointed, from the first
    of: int  # decoder blocks of the model
    setting: bool | int | str  # adapter.gradient_checkpointing
    line: str | None = None  # what to tell the user (set by this module: auto or k blocks)

    def record(self) -> dict:
        return {"blocks": self.blocks, "of": self.of, "setting": self.setting}


def decoder_blocks(model) -> list:
    """The model's blocks that transformers can checkpoint one by one, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_first(model, count: int) -> int:
    """Checkpoint the first `count` decoder blocks (non-reentrant), the others not; returns how
    many are checkpointed (every one where the model's blocks have no switch of their own)."""
    if count <= 0:
        return 0
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "peft_config"):  # as methods/common.py add_lora: the first block's input needs a grad path
        model.enable_input_require_grads()
    blocks = decoder_blocks(model)
    for block in blocks[count:]:
        block.gradient_checkpointing = False
    return min(count, len(blocks)) if blocks else model.config.num_hidden_layers


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


def choose(cfg, model, run, device: torch.device, baseline: float, ranks) -> Checkpointing:
    """How many blocks the run checkpoints; with 'auto', from `run` (plan/run.py run_setup; None
    where the run could not be planned), and under torchrun the most any rank needs, so every rank
    runs alike. Blocks other than every or none are checkpointed here."""
    from ..plan import fewest_within, gib

    setting = cfg.adapter.gradient_checkpointing
    blocks = len(decoder_blocks(model)) or model.config.num_hidden_layers
    if setting is True or setting is False:  # the method has set it up already
        return Checkpointing(blocks if setting else 0, blocks, setting)
    if setting != "auto":  # the first k blocks
        count = checkpoint_first(model, setting)
        return Checkpointing(count, blocks, setting, f"gradient checkpointing: {count} of {blocks} blocks")
    budget = HEADROOM * memory_for_run(device, baseline)
    fewest, why = None, "no plan of the run"
    if run is not None:
        try:
            fewest = fewest_within(run, budget)
            why = (f"the planned peak within {gib(budget)}, {HEADROOM:.0%} of the memory free for it"
                   if fewest is not None else f"even so the planned peak is above {gib(budget)}")
        except Exception as err:  # noqa: BLE001 (an estimate that fails never stops a run)
            why = f"no plan ({type(err).__name__}: {err})"
    count = checkpoint_first(model, int(ranks.most(blocks if fewest is None else fewest)))
    return Checkpointing(count, blocks, setting, f"gradient checkpointing: auto: {count} of {blocks} blocks ({why})")
