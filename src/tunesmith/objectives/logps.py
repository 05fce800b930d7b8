"""Log-probabilities of answer tokens, per token and per sequence, for the policy and the reference.

A batch of sequences is collated in the run's layout (data/collate.py: padded, or padding-free
rows where a fast path's attention is installed) and carries, found on the host, the sequence of
every label position (`label_sequence`) and each sequence's label count (`sequence_labels`). Only
label positions go through the LM head, a chunk at a time; each chunk's logits are recomputed in
the backward pass instead of kept (a 49k vocabulary in fp32 is 200 KiB per answer token).

The reference model costs no second copy for adapter methods: it is the same model with its
adapters disabled (peft's `disable_adapter`). A full fine-tune keeps a frozen copy.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

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
            picked = logits.reshape(-1, logits.shape[-1]).index_select(0, positions).float() / temperature
            return picked.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(picked, dim=-1)
        hidden = decoder(**inputs).last_hidden_state
        picked = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)
        device = picked.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else picked.dtype
        step = head_chunk(head.weight.shape[0], device)
        recompute = torch.is_grad_enabled() and (picked.requires_grad or head.weight.requires_grad)
        chunks = []
        for start in range(0, picked.shape[0], step):
            args = (picked[start:start + step], head.weight, targets[start:start + step], temperature, dtype)
            chunks.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if recompute else _chunk_logps(*args))
    return torch.cat(chunks) if chunks else picked.new_zeros(0, dtype=torch.float32)


def _chunk_logps(hidden, weight, targets, temperature: float, dtype) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        logits = (hidden.to(dtype) @ weight.to(dtype).t()).float() / temperature
        return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


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
