"""Batches in one of three layouts, decided once per run (`layout`):

- padded: micro-batches of similar lengths (little padding), padded on the right;
- padding-free: the examples of a micro-batch end to end in one row (flat_batch), where the
  attention keeps sequences apart (a fast path of accel/ is installed);
- packed: rows of several examples (packing.py) with restarted position ids and a 4D
  block-diagonal causal mask (True = may attend), so packed examples stay isolated.

Every batch also carries, computed on the host, where its labels are (`label_positions`,
`label_targets`, `label_count`): the loss then needs no host synchronisation to find them.
"""
from __future__ import annotations

import random

import torch

from .tokenize import IGNORE, Encoded

PADDED, PADDING_FREE, PACKED = "padded", "padding-free", "packed"
# Rows are rounded up to one of 16 lengths per power of two (steps of 16 tokens at least). Every
# new matmul shape makes oneDNN and PyTorch's CPU kernels build and cache a primitive (caches of
# 1024 entries, about 10 MiB a new shape on the default model): with a row length of its own per
# micro-batch, resident memory grew for ~90 steps (a 108-step LoRA run of the default model peaked
# at 1.48 GiB against 0.85 planned; rounded, 0.94), where with rounded lengths it stays flat. The padding costs 3% of a row
# on average (6% at most); it has no label and, padding-free, is a segment of its own.


def rounded_up(length: int, step: int | None = None) -> int:
    """`length` rounded up to a multiple of `step` (default: 1/16 of its power of two, >= 16)."""
    step = step or max(16, 1 << max(0, length.bit_length() - 5))
    return -(-length // step) * step


def layout(packing: bool, padding_free_attention: bool) -> str:
    """The batch layout of a run: packed rows when asked for, else padding-free where the model's
    attention keeps the sequences of a row apart, else padded."""
    if packing:
        return PACKED
    return PADDING_FREE if padding_free_attention else PADDED


# What one extra forward + backward costs, in padded tokens: measured on the default model on a
# 2-core CPU (1 x 100 tokens: 251 ms, 1 x 200: 365 ms; about 120 tokens' worth of fixed cost).
FORWARD_COST = 128


def step_batches(lengths: list[int], batch_size: int, grad_accum: int, seed: int, token_budget: int | None = None):
    """Endless, seeded stream of optimizer steps, each a list of micro-batches (lists of indices).

    Each step takes the next batch_size * grad_accum examples of a shuffled order (reshuffled
    every epoch), so which examples share a step is as random as in plain shuffled batching.
    Inside the step they are sorted by length and cut into micro-batches of at most batch_size
    examples that waste the least on padding. The loss is normalised over the whole step, so
    the cut does not change the gradient. (Grouping similar lengths across steps instead, as
    length-grouped samplers do, gives steps of short examples their own full-size update: it
    raised eval loss by 0.4% on MedQuAD in bench/train_speed.py.)

    With `token_budget` (padding-free batches, collate(flat=True)) there is no padding to save:
    the step is cut into as few micro-batches of at most token_budget tokens as fit (budget_cut).
    """
    per_step = batch_size * grad_accum
    pending: list[int] = []
    epoch = 0
    while True:
        order = list(range(len(lengths)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        epoch += 1
        for index in order:
            pending.append(index)
            if len(pending) == per_step:
                yield (budget_cut(pending, lengths, token_budget) if token_budget
                       else least_padding_cut(pending, lengths, batch_size))
                pending = []


def least_padding_cut(indices: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """indices sorted by length, cut into runs of at most batch_size minimising padded tokens
    plus FORWARD_COST per micro-batch (dynamic programming over the cut points)."""
    ordered = sorted(indices, key=lambda i: lengths[i])
    n = len(ordered)
    best = [0.0] + [float("inf")] * n  # best[e]: cost of cutting ordered[:e]
    start_of = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - batch_size), end):
            cost = best[start] + lengths[ordered[end - 1]] * (end - start) + FORWARD_COST
            if cost < best[end]:
                best[end], start_of[end] = cost, start
    cuts, end = [], n
    while end:
        cuts.append(ordered[start_of[end]:end])
        end = start_of[end]
    return cuts[::-1]


def budget_cut(indices: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """indices in micro-batches of at most `budget` tokens (an example longer than that alone),
    longest first into the first micro-batch with room: few, evenly filled micro-batches, so the
    matmuls get tall matrices (on a 2-core CPU a [M, 576] x [576, 1536] bf16 matmul runs at about
    500 GFLOP/s for M = 500 and 850 for M = 1600)."""
    batches: list[list[int]] = []
    room: list[int] = []
    for index in sorted(indices, key=lambda i: -lengths[i]):
        slot = next((b for b, free in enumerate(room) if free >= lengths[index]), None)
        if slot is None:
            batches.append([])
            room.append(budget)
            slot = len(batches) - 1
        batches[slot].append(index)
        room[slot] -= lengths[index]
    return batches


def collate(examples: list[Encoded], pad_id: int, flat: bool = False, step: int | None = None) -> dict[str, torch.Tensor]:
    """A micro-batch, its length rounded up (`rounded_up`; step=1 keeps it exact)."""
    batch = flat_batch(examples, pad_id, step) if flat else padded_batch(examples, pad_id, step)
    batch.update(label_index(batch["labels"]))
    return batch


def micro_batch(examples: list[Encoded], layout_name: str, pad_id: int) -> dict:
    """A batch of `examples` in the run's layout (packed rows are collated padded, with their masks)."""
    return collate(examples, pad_id, flat=layout_name == PADDING_FREE)


def label_index(labels: torch.Tensor) -> dict:
    """Positions (in the [batch, length - 1] grid of next-token predictions, flattened) that carry
    a label, their targets and their count: host values, so the loss never asks the device."""
    targets = labels[:, 1:].reshape(-1)
    positions = (targets != IGNORE).nonzero().squeeze(1)
    return {"label_positions": positions, "label_targets": targets[positions], "label_count": int(positions.numel())}


def padded_batch(examples: list[Encoded], pad_id: int, step: int | None = 1) -> dict[str, torch.Tensor]:
    width = rounded_up(max(len(e.input_ids) for e in examples), step)
    # Padded as Python lists, then one tensor each: no small tensor per row.
    ids = torch.tensor([list(e.input_ids) + [pad_id] * (width - len(e.input_ids)) for e in examples], dtype=torch.long)
    labels = torch.tensor([list(e.labels) + [IGNORE] * (width - len(e.labels)) for e in examples], dtype=torch.long)
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples],
                        dtype=torch.long)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if any(e.parts for e in examples):
        batch["position_ids"], batch["attention_mask"] = packed_positions_and_mask(examples, width)
    return batch


def flat_batch(examples: list[Encoded], pad_id: int = 0, step: int | None = 1) -> dict[str, torch.Tensor]:
    """The examples end to end in one row: position ids restart at each example and cu_seq_lens
    (cumulative lengths, transformers' padding-free convention) tells attention where each ends
    (the fast paths' attention keeps them apart). The first label of each example is dropped: in
    a row it would be predicted from the previous example's last token, and in a padded batch it
    is never predicted at all. A row rounded up (`rounded_up(length, step)`) ends with a segment of
    padding, without labels, that attends only to itself."""
    ids, labels, positions, ends = [], [], [], [0]
    for example in examples:
        if example.parts:
            raise ValueError("flat_batch takes unpacked examples")
        ids += list(example.input_ids)
        labels += example.labels_in_a_row()
        positions += range(len(example.input_ids))
        ends.append(ends[-1] + len(example.input_ids))
    padding = rounded_up(ends[-1], step) - ends[-1]
    if padding:
        ids += [pad_id] * padding
        labels += [IGNORE] * padding
        positions += range(padding)
        ends.append(ends[-1] + padding)
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens": torch.tensor(ends, dtype=torch.int32),
            "max_length": max(b - a for a, b in zip(ends[:-1], ends[1:]))}


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
