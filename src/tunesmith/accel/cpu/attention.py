"""Causal attention for training on CPU from batched matmuls, faster than torch's CPU flash kernel.

Profiled on the default model (bf16, LoRA, 4 x 400 tokens), scaled_dot_product_attention's CPU
flash kernel took 35% of a training step, about 30 ms per layer at roughly 40 GFLOP/s, while a
bf16 batched matmul of the same shapes runs at 600+ GFLOP/s. Here QK^T, PV and their gradients
are batched matmuls and the softmax and its gradient are one compiled element-wise pass each
(accel/compile.py). Like a flash kernel it keeps only q, k, v, the output and one
log-sum-exp per row for the backward pass, and recomputes the probabilities there; the full
score matrix of one layer lives only while that layer runs.

Padding-free batches (data/collate.py `collate(..., flat=True)`: the examples of a micro-batch
end to end in one row, position ids restarting at each, and their bounds as transformers'
cu_seq_lens_q) go through SegmentedAttention: each example attends to itself alone, so the linear
layers see one tall matrix with no padding rows while attention costs only the sum of the
squared lengths.

Grouped-query attention needs no copies of k and v: the query heads that share a key/value head
are stacked along the rows. Used for training shapes only (as many queries as keys, no dropout);
everything else goes to transformers' SDPA path.
"""
from __future__ import annotations

import functools

import torch

from . import native
from ..compile import compiled
from ..rows import per_sequence_sdpa

NAME = "tunesmith_causal"
LIBRARIES = ("transformers",)


@compiled
def _softmax_forward(scores, bias, scale: float):
    logits = scores.float() * scale + bias
    top = logits.amax(-1, keepdim=True).clamp_min(-1e30)  # a row with no allowed key stays finite
    exp = (logits - top).exp()
    total = exp.sum(-1, keepdim=True)
    return (exp / total.clamp_min(1e-30)).to(scores.dtype), (top + total.clamp_min(1e-30).log())


@compiled
def _softmax_recompute(scores, bias, scale: float, lse):
    return (scores.float() * scale + bias - lse).exp().to(scores.dtype)


@compiled
def _softmax_backward(probs, grad_probs, delta, scale: float):
    return (probs.float() * (grad_probs.float() - delta) * scale).to(probs.dtype)


@compiled
def _row_delta(grad_out, out):
    return (grad_out.float() * out.float()).sum(-1, keepdim=True)


def _stack_groups(q, groups: int):
    """[B, H, S, D] -> [B, Hkv, G*S, D]: the query heads of one key/value head one above the other."""
    b, h, s, d = q.shape
    return q.reshape(b, h // groups, groups * s, d)


class CausalAttention(torch.autograd.Function):
    """q [B, Hkv, G*S, D]; k, v [B, Hkv, S, D]; bias (fp32, 0 = may attend, -inf = may not)
    broadcastable to [B, Hkv, G, S, S] -> output [B, S, H, D], the layout the output projection
    reads (so it keeps a view, not a copy)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, groups):
        out, lse = _attend(q, k, v, bias, scale, groups)
        out = out.contiguous()
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.scale, ctx.groups = scale, groups
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, bias = ctx.saved_tensors
        return *_attend_backward(q, k, v, _row_delta(grad_out, out), lse, bias, grad_out, ctx.scale, ctx.groups), \
            None, None, None


class SegmentedAttention(torch.autograd.Function):
    """Several sequences laid end to end in one row (padding-free batches): q [1, H, T, D], k, v
    [1, Hkv, T, D], `bounds` ((start, end), ...) covering 0..T -> output [1, T, H, D]. Each sequence
    attends causally to itself only, so the work is the sum of its lengths squared, not T squared;
    and a sequence's queries go in blocks of about BLOCK_ROWS (`_pieces`), each against the keys up
    to its own end, so most of the masked upper triangle is never multiplied."""

    @staticmethod
    def forward(ctx, query, key, value, bounds, scale, groups):
        out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
        bias = _causal_bias(max(end - start for start, end in bounds), query.device)
        pieces = _pieces(bounds, BLOCK_ROWS)
        lses = []
        for first, end, start in pieces:
            q, k, v = _piece(query, key, value, first, end, start, groups)
            out[:, first:end], lse = _attend(q, k, v, bias[first - start:end - start, :end - start], scale, groups)
            lses.append(lse)
        ctx.save_for_backward(query, key, value, out, bias, *lses)
        ctx.bounds, ctx.pieces, ctx.scale, ctx.groups = bounds, pieces, scale, groups
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, bias, *lses = ctx.saved_tensors
        grad_q, grad_k, grad_v = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        delta = _row_delta(grad_out, out)
        ends = {stop for _, stop in ctx.bounds}
        # Last pieces first: a sequence's last piece sees all its keys and writes their gradients,
        # the earlier ones (fewer keys) add to them.
        for (first, end, start), lse in reversed(tuple(zip(ctx.pieces, lses))):
            q, k, v = _piece(query, key, value, first, end, start, ctx.groups)
            dq, dk, dv = _attend_backward(q, k, v, delta[:, first:end], lse, bias[first - start:end - start, :end - start],
                                          grad_out[:, first:end], ctx.scale, ctx.groups)
            grad_q[:, :, first:end] = dq.view(grad_q.shape[0], grad_q.shape[1], end - first, -1)
            if end in ends:  # the last piece of its sequence
                grad_k[:, :, start:end], grad_v[:, :, start:end] = dk, dv
            else:
                grad_k[:, :, start:end] += dk
                grad_v[:, :, start:end] += dv
        return grad_q, grad_k, grad_v, None, None, None


# Query rows per block of a sequence (_pieces). A block of n rows against the keys up to its end
# multiplies (n + 1) / 2n of the full square for n blocks, at the price of more, smaller matmuls.
BLOCK_ROWS = 224


def _pieces(bounds: tuple, rows: int) -> tuple:
    """(first query, end, sequence start) per piece: each sequence's queries cut into about
    equal blocks of about `rows`, each attending the keys from the sequence start to its own end."""
    pieces = []
    for start, end in bounds:
        blocks = max(1, round((end - start) / rows))
        cuts = [start + (end - start) * n // blocks for n in range(blocks + 1)]
        pieces += [(first, last, start) for first, last in zip(cuts[:-1], cuts[1:])]
    return tuple(pieces)


def _piece(query, key, value, first: int, end: int, start: int, groups: int):
    return _stack_groups(query[:, :, first:end], groups), key[:, :, start:end], value[:, :, start:end]


def _attend(q, k, v, bias, scale: float, groups: int):
    """-> (output as a [B, S, H, D] view, log-sum-exp per query row)."""
    b, kv, _, d = q.shape
    probs, lse = _softmax_forward(_scores(q, k, groups), bias, scale)
    return (probs.flatten(2, 3) @ v).view(b, kv * groups, -1, d).transpose(1, 2), lse


def _attend_backward(q, k, v, delta, lse, bias, grad_out, scale: float, groups: int):
    """-> gradients of q (stacked groups), k and v; the probabilities are recomputed from lse.
    delta: rowsum(dO * O) = rowsum(dP * P) per query row ([B, S, H, 1], _row_delta)."""
    b, kv, _, d = q.shape
    delta = delta.transpose(1, 2).reshape(b, kv, groups, -1, 1)
    grad_out = grad_out.transpose(1, 2).reshape(b, kv, -1, d)
    probs = _softmax_recompute(_scores(q, k, groups), bias, scale, lse).flatten(2, 3)
    grad_v = probs.transpose(-1, -2) @ grad_out
    grad_probs = (grad_out @ v.transpose(-1, -2)).unflatten(2, (groups, -1))
    grad_scores = _softmax_backward(probs.unflatten(2, (groups, -1)), grad_probs, delta, scale)
    del probs, grad_probs
    grad_scores = grad_scores.flatten(2, 3)
    return grad_scores @ k, grad_scores.transpose(-1, -2) @ q, grad_v


def _scores(q, k, groups: int):
    """q @ k^T as [B, Hkv, G, S, S], so one [S, S] or [B, 1, 1, S, S] mask serves every group."""
    return (q @ k.transpose(-1, -2)).unflatten(2, (groups, -1))


@functools.lru_cache(maxsize=4)
def _causal_bias(size: int, device: torch.device) -> torch.Tensor:
    """One [S, S] causal bias, shared by every layer (each keeps it for its backward)."""
    allowed = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    return _as_bias(allowed)


def _as_bias(allowed: torch.Tensor) -> torch.Tensor:
    # An fp32 bias, not the boolean mask: the compiled softmax reads a float in the same vector
    # loop, where a boolean mask costs conversions (13 ms against 4 ms per layer, 4 x 400 tokens).
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _once_per_forward(cache: list, key, build):
    """build(key), remembered while the same object comes back: every layer of one forward gets
    the same mask (or cu_seq_lens) tensor, so its bias (or bounds) is made once, not per layer."""
    if cache[0] is not key:
        cache[:] = [key, build(key)]
    return cache[1]


_last_mask: list = [None, None]  # (the boolean mask of the current forward, its bias)


def _padding_bias(mask: torch.Tensor) -> torch.Tensor:
    return _once_per_forward(_last_mask, mask, lambda m: _as_bias(m[:, :, None]))


def causal_attention(query, key, value, attention_mask, scaling: float, bounds: tuple | None = None):
    """query [B, H, S, D], key/value [B, Hkv, S, D], attention_mask None (causal) or a boolean
    [B, 1, S, S] (True = may attend) -> output [B, S, H, D]. With `bounds` (B = 1: sequences end to
    end, ((start, end), ...)) each sequence attends to itself only and the mask is not read."""
    b, h, s, d = query.shape
    groups = h // key.shape[1]
    # Under autocast (full fine-tuning of a bf16 model) rotary embeddings leave q and k in fp32 and v
    # in bf16; SDPA would cast them all to the autocast dtype, so do the same (the backward runs
    # outside autocast and needs one dtype).
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if bounds is not None:
        if dtype == torch.bfloat16 and device == "cpu" and native.chosen(h, key.shape[1], d, SegmentedAttention):
            return native.NativeSegmentedAttention.apply(query, key, value, bounds, scaling, groups)
        return SegmentedAttention.apply(query, key, value, bounds, scaling, groups)
    bias = _causal_bias(s, query.device) if attention_mask is None else _padding_bias(attention_mask)
    return CausalAttention.apply(_stack_groups(query, groups), key, value, bias, scaling, groups)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' attention-function interface."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = _bounds(kwargs, query.shape) if query.shape[2] == key.shape[2] else None  # a padding-free row
    # A sliding window matters only where a sequence is longer than it: in a row, its longest one.
    longest = max(end - start for start, end in bounds) if bounds else key.shape[2]
    causal_groups = getattr(module, "is_causal", True) and query.shape[1] % key.shape[1] == 0
    plain = (query.shape[2] == key.shape[2] and dropout == 0.0 and kwargs.get("softcap") is None
             and kwargs.get("position_bias") is None and kwargs.get("cache") is None
             and (attention_mask is None or attention_mask.dtype == torch.bool) and causal_groups
             and value.shape[-1] == query.shape[-1]  # not MLA (DeepSeek-V2/V3: values of another head size)
             and (kwargs.get("sliding_window") or longest) >= longest)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if not plain and bounds is not None and causal_groups:
        # The row has no mask to give SDPA (accel/rows.py): one sequence at a time.
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        ends = [0] + [end for _, end in bounds]
        return per_sequence_sdpa(q, k, v, ends, scale, kwargs.get("sliding_window"), dropout).unsqueeze(0), None
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return causal_attention(query, key, value, attention_mask, scale, bounds), None


_last_bounds: list = [None, None]  # (cu_seq_lens tensor of the current forward, its bounds)


def _bounds(kwargs: dict, shape) -> tuple | None:
    """((start, end), ...) of a padding-free row from transformers' cu_seq_lens_q (cumulative
    lengths, as for flash attention), read once per forward; None for ordinary batches."""
    cumulative = kwargs.get("cu_seq_lens_q")
    if cumulative is None or shape[0] != 1 or kwargs.get("cu_seq_lens_k") is not cumulative:
        return None

    def bounds(cumulative) -> tuple:
        ends = cumulative.tolist()
        if ends[0] != 0 or ends[-1] != shape[2]:
            raise ValueError(f"cu_seq_lens_q {ends} does not cover the {shape[2]} positions of the row")
        return tuple(zip(ends[:-1], ends[1:]))

    return _once_per_forward(_last_bounds, cumulative, bounds)


def install(model) -> int:
    """Use this attention for `model` where it runs SDPA on the CPU; 1 if it was switched, else 0."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    config = model.config
    # meta: a sharded run's skeleton, its weights loaded onto the CPU later (training/sharded_start.py)
    if getattr(config, "_attn_implementation", None) != "sdpa" or next(model.parameters()).device.type not in ("cpu", "meta"):
        return 0
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return 1
