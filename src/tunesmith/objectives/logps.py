"""Log-probabilities of answer tokens, per token and per sequence, for the policy and the reference.

A batch of sequences is collated in the run's layout (data/collate.py: padded, or padding-free
rows where a fast path's attention is installed) and carries, found on the host, the sequence of
every label position (`label_sequence`) and each sequence's label count (`sequence_labels`). Only
label positions go through the LM head, a chunk at a time, and no chunk's logits are kept (a 49k
vocabulary in fp32 is 200 KiB per answer token): through a frozen head each token's gradient with
respect to its hidden state is computed in the forward pass (HeadTokenLogps); a head that trains
recomputes each chunk in the backward pass.

The reference model costs no second copy for adapter methods: it is the same model with its
adapters disabled (peft's `disable_adapter`). A full fine-tune keeps a frozen copy.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..accel.compile import compiled
from ..data.collate import PADDING_FREE, micro_batch
from ..data.tokenize import Encoded
from ..training.loss import _core, half_precision_adapters, head_chunk, model_inputs


def sequence_batch(sequences: list[Encoded], layout: str, pad_id: int) -> dict:
    """A micro-batch of `sequences` with, for every label position, the index of its sequence."""
    batch = micro_batch(sequences, layout, pad_id)
    positions = batch["label_positions"]
    if layout == PADDING_FREE:
        ends = batch["cu_seq_lens"][1:].long()
        owner = torch.bucketize(positions + 1, ends, right=True)  # the predicted token's sequence
    else:
        owner = torch.div(positions, batch["input_ids"].shape[1] - 1, rounding_mode="floor")
    batch["label_sequence"] = owner
    batch["sequence_count"] = len(sequences)
    batch["sequence_labels"] = torch.bincount(owner, minlength=len(sequences)).float()
    return batch


def token_logps(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """log p(label token | its prefix) at every label position of the batch (flattened, in order),
    of the logits divided by `temperature`; differentiable where gradients are enabled."""
    decoder, head, config = _core(model)
    inputs = model_inputs(config, batch, head.weight.dtype)
    positions, targets = batch["label_positions"], batch["label_targets"]
    with half_precision_adapters(model, head.weight.dtype):
        if getattr(config, "final_logit_softcapping", None) or getattr(head, "bias", None) is not None:
            logits = model(**inputs).logits[:, :-1]  # heads that transform their logits: the model's own forward
            picked = logits.reshape(-1, logits.shape[-1]).index_select(0, positions)
            return _target_logps(picked, targets, 1 / temperature)
        hidden = decoder(**inputs).last_hidden_state
        picked = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)
        device = picked.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else picked.dtype
        if not torch.is_grad_enabled() or not (picked.requires_grad or head.weight.requires_grad):
            return _head_logps(picked, head.weight, targets, temperature, dtype, None)
        if not head.weight.requires_grad:
            return HeadTokenLogps.apply(picked, head.weight, targets, temperature, dtype)
        # a head that trains (full fine-tuning): each chunk recomputed in the backward pass
        step = head_chunk(head.weight.shape[0], device)
        chunks = [checkpoint(_chunk_logps, picked[start:start + step], head.weight, targets[start:start + step],
                             temperature, dtype, use_reentrant=False) for start in range(0, picked.shape[0], step)]
    return torch.cat(chunks) if chunks else picked.new_zeros(0, dtype=torch.float32)


def _chunk_logps(hidden, weight, targets, temperature: float, dtype) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        return _target_logps(hidden.to(dtype) @ weight.to(dtype).t(), targets, 1 / temperature)


def _target_logps(logits, wanted, inverse_temperature: float):
    """log softmax(logits / temperature) at `wanted`, in fp32."""
    scaled = logits.float() * inverse_temperature
    return scaled.gather(1, wanted[:, None]).squeeze(1) - torch.logsumexp(scaled, dim=-1)


_logps = compiled(_target_logps)  # a frozen head's chunks without gradients: one pass over the logits


def _head_logps(hidden, weight, targets, temperature: float, dtype, grad_hidden) -> torch.Tensor:
    """log p(target) of each row of `hidden` through the head, a chunk at a time; with
    `grad_hidden`, each row's gradient of its own log-prob with respect to its hidden state is
    written into it."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    step = head_chunk(weight.shape[0], hidden.device.type)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], step):
            logits = hidden[start:start + step].to(dtype) @ w.t()
            wanted = targets[start:start + step]
            if grad_hidden is None:
                out[start:start + step] = _logps(logits, wanted, 1 / temperature)
                continue
            out[start:start + step], grad = _logps_and_grad(logits, wanted, 1 / temperature)
            grad_hidden[start:start + step] = grad @ w
    return out


@compiled
def _logps_and_grad(logits, wanted, inverse_temperature: float):
    """Each row's log p(wanted) in fp32 and its gradient d/d(logits) = (one-hot - softmax) / temperature."""
    scaled = logits.float() * inverse_temperature
    norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    logps = scaled.gather(1, wanted[:, None]).squeeze(1) - norm.squeeze(1)
    grad = (F.one_hot(wanted, scaled.shape[-1]).to(scaled.dtype) - (scaled - norm).exp()) * inverse_temperature
    return logps, grad.to(logits.dtype)


class HeadTokenLogps(torch.autograd.Function):
    """Per-row log p(target) through a frozen head. A row's log-prob depends on its own hidden state
    only, so the gradient of each is computed in the forward pass (one row of hidden size each) and
    the backward scales those rows by the incoming gradients: no chunk's logits are kept or
    recomputed (the checkpointed chunks held about 20 bytes per chunk logit in their backward;
    this holds what training/loss.py's cross-entropy holds)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, dtype):
        grad_hidden = torch.empty_like(hidden)
        out = _head_logps(hidden, weight, targets, temperature, dtype, grad_hidden)
        ctx.save_for_backward(grad_hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out[:, None].to(grad_hidden.dtype), None, None, None, None


def per_sequence(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sum of per-token values over each sequence's label positions."""
    out = torch.zeros(batch["sequence_count"], dtype=values.dtype, device=values.device)
    return out.index_add(0, batch["label_sequence"], values)


class Reference:
    """The reference policy: the model with its adapters disabled, or a frozen copy (full fine-tuning)."""

    def __init__(self, model, copy=None):
        self.model, self.copy = model, copy

    @contextlib.contextmanager
    def active(self, model=None):
        """The reference to call: `model` (the policy being trained) with adapters off, or the copy."""
        if self.copy is not None:
            yield self.copy
            return
        model = model if model is not None else self.model
        with model.disable_adapter():
            yield model

    @torch.no_grad()
    def token_logps(self, batch: dict, model=None, temperature: float = 1.0) -> torch.Tensor:
        with self.active(model) as reference:
            was_training = reference.training
            reference.eval()  # no dropout in the reference
            try:
                return token_logps(reference, batch, temperature)
            finally:
                reference.train(was_training)
