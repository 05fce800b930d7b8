"""Summed next-token loss over label tokens, without full-vocabulary logits for every position.

Only positions that carry a label go through the LM head, a few hundred at a time, with the
cross-entropy in fp32. Each chunk's gradient is computed right after its loss, in the forward
pass, so no chunk's logits outlive it: the backward pass keeps only the gradient of the hidden
states (and of the head weight where it trains). For a 49k vocabulary that is tens of MiB
instead of a fp32 log-softmax per label position (4 x 512 positions: 400 MiB). The sum (not the
mean) is returned with the label count, so the caller can normalise once over a whole
optimizer step.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..accel.compile import compiled
from ..accel.rows import bounds_only_mask
from ..device import compute_device

CHUNK_ELEMENTS = 2**24  # logits per chunk on the CPU: 341 label positions of a 49k vocabulary, 64 MiB in fp32
# On a GPU a chunk is one kernel launch per matmul: larger chunks (256 MiB of fp32 logits) keep it busy.
CUDA_CHUNK_ELEMENTS = 2**26


def head_chunk(vocab: int, device: str = "cpu") -> int:
    """Label positions per LM-head chunk."""
    return max(16, (CUDA_CHUNK_ELEMENTS if device == "cuda" else CHUNK_ELEMENTS) // vocab)


def _core(model):
    """(decoder, lm_head) of a causal LM, through a PEFT wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings(), base.config


def model_inputs(config, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """input_ids, attention mask and (for packed rows) position ids, as the attention implementation wants them.

    A packed batch carries a 4D boolean block-diagonal mask; SDPA takes it as is, eager attention
    adds it to the scores, so it becomes 0 / -inf there. A padding-free row (collate flat=True)
    has no mask: its sequence bounds go to the attention function as cu_seq_lens_q / _k, and an
    empty mask stands in, so transformers neither looks for packing on the device nor builds a
    mask (accel/rows.py).
    """
    # No KV cache: a training or scoring forward never decodes further.
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    if "cu_seq_lens" in batch:
        bounds = batch["cu_seq_lens"]
        longest = batch.get("max_length") or int((bounds[1:] - bounds[:-1]).max())
        inputs.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest,
                      attention_mask=bounds_only_mask(batch["input_ids"].device))
        return inputs
    mask = batch["attention_mask"]
    if mask.ndim == 2:
        inputs["attention_mask"] = mask
        return inputs
    masks = by_layer_type(config, mask)
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        masks = {kind: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
                 for kind, m in masks.items()}
    inputs["attention_mask"] = masks if len(masks) > 1 else next(iter(masks.values()))
    return inputs


def by_layer_type(config, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A packed batch's block-diagonal mask as each kind of layer attends: transformers takes a 4D
    mask as it is, so a sliding window (Mistral, Phi-3; Gemma 3's sliding layers beside its full
    ones) must be in it, or an example longer than the window trains with full attention there."""
    window = getattr(config, "sliding_window", None)
    if not window or mask.shape[-1] <= window:
        return {"full_attention": mask}
    rows = torch.arange(mask.shape[-1], device=mask.device)
    near = (rows[:, None] - rows[None, :]) < window  # within a block the distance in the row is in the example
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention"])
    return {kind: mask & near if kind == "sliding_attention" else mask for kind in sorted(kinds)}


def half_precision_adapters(model, dtype: torch.dtype):
    """Adapter matmuls in the frozen base's half dtype, their fp32 weights kept as the master copy.

    PEFT keeps LoRA weights in fp32 and casts every layer input to fp32 for them, then adds an fp32
    result to the bf16 output: three activation-sized copies per adapted layer and direction, and
    fp32 matmuls. Profiled on the default model, those casts took about a third of a training step.
    Under autocast the small weights are cast once per forward instead, and activations stay in
    bf16; gradients still reach the fp32 weights, so the optimizer updates lose nothing.
    """
    if dtype not in (torch.bfloat16, torch.float16) or not hasattr(model, "peft_config"):
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    device = compute_device(model).type
    stack = contextlib.ExitStack()
    stack.enter_context(disable_input_dtype_casting(model))
    stack.enter_context(torch.autocast(device, dtype=dtype))
    return stack


def label_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed loss over the batch's label tokens, their count) of a batch collated by data/collate.py
    (on the model's device; the label positions and count were found on the host)."""
    decoder, head, config = _core(model)
    if "label_positions" not in batch:  # a batch built elsewhere: find its labels here
        from ..data.collate import label_index

        batch = {**batch, **{k: v.to(head.weight.device) if isinstance(v, torch.Tensor) else v
                             for k, v in label_index(batch["labels"].cpu()).items()}}
    inputs = model_inputs(config, batch, head.weight.dtype)
    with half_precision_adapters(model, head.weight.dtype):
        return _loss_sum(model, decoder, head, config, inputs, batch["label_positions"], batch["label_targets"]), \
            batch["label_count"]


@torch.no_grad()
def label_token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of every label token of a collated batch, in order (evaluation: no gradients)."""
    decoder, head, config = _core(model)
    inputs = model_inputs(config, batch, head.weight.dtype)
    positions, targets = batch["label_positions"], batch["label_targets"]
    with half_precision_adapters(model, head.weight.dtype):
        if _logits_beyond_head(head, config):
            return _model_forward_losses(model, inputs, positions, targets, "none")
        hidden = decoder(**inputs).last_hidden_state
        return head_token_losses(head, hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions), targets)


def head_token_losses(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of `hidden` (label positions only) through the LM head, a chunk at a time."""
    step = head_chunk(head.weight.shape[0], hidden.device.type)
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.cat([_cross_entropy(hidden[start:start + step] @ head.weight.t(), targets[start:start + step])
                          for start in range(0, hidden.shape[0], step)])


def needs_full_forward(model) -> bool:
    """Whether logits come from more than the head's matmul (softcapping, a head bias): then the
    model's own forward computes them, not the decoder and head apart."""
    _, head, config = _core(model)
    return _logits_beyond_head(head, config)


def _logits_beyond_head(head, config) -> bool:
    return bool(getattr(config, "final_logit_softcapping", None)) or getattr(head, "bias", None) is not None


def _model_forward_losses(model, inputs, positions, targets, reduction: str) -> torch.Tensor:
    """Cross-entropy at the label positions from the model's own forward (architectures that
    transform logits after the head)."""
    logits = model(**inputs).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).index_select(0, positions).float(), targets,
                           reduction=reduction)


def _loss_sum(model, decoder, head, config, inputs, positions, targets) -> torch.Tensor:
    if _logits_beyond_head(head, config):
        return _model_forward_losses(model, inputs, positions, targets, "sum")
    hidden = decoder(**inputs).last_hidden_state
    picked = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)
    device = picked.device.type
    # The dtype of the head's matmul: autocast's where it is on (fp32 master weights of a full fine-tune).
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else picked.dtype
    if torch.is_grad_enabled() and (picked.requires_grad or head.weight.requires_grad):
        return HeadCrossEntropy.apply(picked, head.weight, targets, dtype)
    return _chunk_losses(picked, head.weight, targets, dtype, None)  # evaluation: no gradients


def _chunk_losses(hidden, weight, targets, dtype, grads: tuple | None) -> torch.Tensor:
    """Summed cross-entropy of hidden @ weight.T against targets, chunk by chunk; with `grads`
    (hidden's, weight's or None) also the gradient of that sum, written into them."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunks(hidden, weight.to(dtype), targets, dtype, grads)


def _chunks(hidden, w, targets, dtype, grads) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    step = head_chunk(w.shape[0], hidden.device.type)
    for start in range(0, hidden.shape[0], step):
        h = hidden[start:start + step].to(dtype)
        wanted = targets[start:start + step]
        logits = h @ w.t()
        if grads is None:
            total += _cross_entropy_sum(logits, wanted)
            continue
        loss, g = _cross_entropy_and_grad(logits, wanted)
        total += loss
        grads[0][start:start + step] = g @ w
        if grads[1] is not None:
            grads[1].add_((g.t() @ h).float())
    return total


@compiled
def _cross_entropy_sum(logits, wanted):
    return _cross_entropy(logits, wanted).sum()


def _cross_entropy(logits, wanted):
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, wanted[:, None]).squeeze(1)


@compiled
def _cross_entropy_and_grad(logits, wanted):
    """The summed cross-entropy in fp32 and its gradient d/d(logits) = softmax - one-hot, in the
    logits' dtype: one pass over the chunk when compiled (eager: five, over fp32 copies)."""
    full = logits.float()
    norm = torch.logsumexp(full, dim=-1, keepdim=True)
    loss = (norm.squeeze(1) - full.gather(1, wanted[:, None]).squeeze(1)).sum()
    grad = (full - norm).exp() - F.one_hot(wanted, full.shape[-1]).to(full.dtype)
    return loss, grad.to(logits.dtype)


class HeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) whose gradients are computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        total = _chunk_losses(hidden, weight, targets, dtype, (grad_hidden, grad_weight))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight, None, None
