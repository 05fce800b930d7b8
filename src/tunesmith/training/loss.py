"""Summed next-token loss over label tokens, without full-vocabulary logits for every position.

Only positions that carry a label go through the LM head, in chunks, with the cross-entropy in
fp32. For a 49k vocabulary and answers that are a fraction of each sequence, this skips most of
the head's work and memory. The sum (not the mean) is returned with the label count, so the
caller can normalise once over a whole optimizer step.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..data.tokenize import IGNORE

CHUNK = 2048


def _core(model):
    """(decoder, lm_head) of a causal LM, through a PEFT wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings(), base.config


def model_inputs(config, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """input_ids, attention mask and (for packed rows) position ids, as the attention implementation wants them.

    A packed batch carries a 4D boolean block-diagonal mask; SDPA takes it as is, eager attention
    adds it to the scores, so it becomes 0 / -inf there.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    mask = inputs["attention_mask"]
    if mask.ndim == 4 and getattr(config, "_attn_implementation", "sdpa") == "eager":
        inputs["attention_mask"] = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return inputs


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

    device = next(model.parameters()).device.type
    stack = contextlib.ExitStack()
    stack.enter_context(disable_input_dtype_casting(model))
    stack.enter_context(torch.autocast(device, dtype=dtype))
    return stack


def label_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    decoder, head, config = _core(model)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    count = int(keep.sum())
    inputs = model_inputs(config, batch, head.weight.dtype)
    with half_precision_adapters(model, head.weight.dtype):
        return _loss_sum(model, decoder, head, config, inputs, targets, keep), count


def _loss_sum(model, decoder, head, config, inputs, targets, keep) -> torch.Tensor:
    if getattr(config, "final_logit_softcapping", None):
        # Architectures that transform logits after the head: use their own forward.
        logits = model(**inputs).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    hidden = decoder(**inputs).last_hidden_state
    picked = hidden[:, :-1][keep]
    wanted = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, picked.shape[0], CHUNK):
        logits = head(picked[start:start + CHUNK]).float()
        total = total + F.cross_entropy(logits, wanted[start:start + CHUNK], reduction="sum")
    return total
