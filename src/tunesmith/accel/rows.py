"""Padding-free rows on either device: what stands for their mask, and SDPA one sequence at a time.

A padding-free row (data/collate.py `flat_batch`) carries its sequence bounds as cu_seq_lens, and
the fast paths' attention reads those, not a mask. Given position ids without a mask,
transformers would detect the packing itself (masking_utils.find_packed_sequence_indices, which
reads the device: one host synchronisation per forward on a GPU) and build a block-diagonal
row x row mask that nobody reads. An empty 4D mask stands in for it: transformers passes a 4D
mask through unchanged, and anything that did try to apply it would fail on its shape rather
than attend across sequences.
"""
from __future__ import annotations

import torch


def bounds_only_mask(device: torch.device) -> torch.Tensor:
    """The attention mask of a padding-free row: empty; its bounds are in cu_seq_lens."""
    return torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device)


# id -> (the device copy of a row's cu_seq_lens, its bounds as host ints), set as rows are copied
# to the device (device.to_device), where the bounds are still on the host; the newest few (a KTO
# step moves two rows). Holding each tensor keeps its id from going to another while it is here.
_host_bounds: dict[int, tuple[torch.Tensor, list[int]]] = {}
HELD_BOUNDS = 8


def remember_bounds(on_device: torch.Tensor, on_host: torch.Tensor) -> None:
    _host_bounds[id(on_device)] = (on_device, on_host.tolist())
    while len(_host_bounds) > HELD_BOUNDS:
        del _host_bounds[next(iter(_host_bounds))]


def bounds_list(cumulative: torch.Tensor) -> list[int]:
    """A row's cu_seq_lens as host ints, for a row copied to the device without reading the device
    (once per layer and forward, on CUDA a host synchronisation each: fp32 rows, attention dropout)."""
    held = _host_bounds.get(id(cumulative))
    return held[1] if held is not None and held[0] is cumulative else cumulative.tolist()


def per_sequence_sdpa(q, k, v, ends: list[int], scale: float, window: int | None, dropout: float = 0.0):
    """q [T, H, D], k, v [T, Hkv, D] -> [T, H, D]: SDPA, causal, on each sequence of the row alone
    (within `window` positions where given). The reference the kernels are tested against, and
    what runs for a row they do not take (attention dropout; on the CPU a window shorter than one of
    its sequences)."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])  # values may have their own head size (MLA)
    groups = q.shape[1] // k.shape[1]
    for start, end in zip(ends[:-1], ends[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [H, S, D]
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        mask = None
        if window and window < end - start:
            rows = torch.arange(end - start, device=q.device)
            mask = (rows[:, None] >= rows[None, :]) & (rows[:, None] - rows[None, :] < window)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale, dropout_p=dropout).transpose(0, 1)
    return out
