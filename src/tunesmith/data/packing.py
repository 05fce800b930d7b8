"""Packing: several training examples in one row, as pure functions over token lists.

Rows are filled best-fit decreasing (longest examples first, each into the fullest row it still
fits), which wastes little space and is deterministic. A packed row remembers the length of
each example (`Encoded.parts`); collation turns that into restarted position ids and a
block-diagonal causal mask, so no example attends to another (position ids alone do not
isolate them in transformers' SDPA path). Each example's first label is dropped, so none is
learned from the previous example's last token (with `train_on_inputs` every token has one).
"""
from __future__ import annotations

import bisect

from .tokenize import Encoded


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of example indices, each row at most `capacity` tokens; every index exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row number), sorted
    for index in order:
        size = lengths[index]
        if size > capacity:
            raise ValueError(f"example {index} has {size} tokens, more than the row capacity {capacity}")
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        if space - size > 0:
            bisect.insort(free, (space - size, row))
    return rows


def pack_examples(examples: list[Encoded], capacity: int) -> tuple[list[Encoded], list[list[int]]]:
    """Packed rows and, for each, the indices of the examples in it."""
    groups = pack([len(e.input_ids) for e in examples], capacity)
    rows = []
    for group in groups:
        ids = [t for i in group for t in examples[i].input_ids]
        labels = [t for i in group for t in examples[i].labels_in_a_row()]  # none learned across examples
        rows.append(Encoded(ids, labels, [len(examples[i].input_ids) for i in group]))
    return rows, groups


def as_trained(split, data_cfg):
    """The training split as a run trains on it: in packed rows where data.packing says so."""
    return pack_split(split, data_cfg.max_seq_len) if data_cfg.packing else split


def pack_split(split, capacity: int):
    """The training split as packed rows (a Split whose `encoded` are rows with `parts`)."""
    from .prepare import Split

    rows, groups = pack_examples(split.encoded, capacity)
    conversations = [[m for i in group for m in split.conversations[i]] for group in groups]
    origins = [split.origins[group[0]] for group in groups] if split.origins else []
    return Split(split.name, conversations, rows, origins)
