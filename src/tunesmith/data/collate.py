"""Batches: similar lengths together (little padding), padded on the right.

A batch of packed rows (see packing.py) also gets restarted position ids and a 4D
block-diagonal causal mask (True = may attend), so packed examples stay isolated.
"""
from __future__ import annotations

import random

import torch

from .tokenize import IGNORE, Encoded


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int = 0) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths.

    Indices are shuffled, cut into windows of 50 batches, sorted by length inside each window,
    cut into batches, and the batches shuffled again: random order, little padding.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    # Padded as Python lists, then one tensor each: no small tensor per row.
    ids = torch.tensor([list(e.input_ids) + [pad_id] * (width - len(e.input_ids)) for e in examples], dtype=torch.long)
    labels = torch.tensor([list(e.labels) + [IGNORE] * (width - len(e.labels)) for e in examples], dtype=torch.long)
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples],
                        dtype=torch.long)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if any(e.parts for e in examples):
        batch["position_ids"], batch["attention_mask"] = packed_positions_and_mask(examples, width)
    return batch


def packed_positions_and_mask(examples: list[Encoded], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids that restart at each example, and a (batch, 1, width, width) block-diagonal causal mask.

    The padding at the end of a row is one more block, so every query attends to at least itself
    (an all-masked row would make SDPA return NaN, which would then leak into the gradients).
    """
    segment = torch.empty((len(examples), width), dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        parts = list(example.parts or [len(example.input_ids)])
        parts.append(width - sum(parts))
        start = 0
        for number, size in enumerate(parts):
            segment[row, start:start + size] = number
            positions[row, start:start + size] = torch.arange(size)
            start += size
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    return positions, (same & causal)[:, None]
