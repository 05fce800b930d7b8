"""A plain LoRA linear layer as one autograd function: fewer passes over the activations.

PEFT's LoRA forward is base(x) + B(A(x)) * scaling: after the base matmul it writes the rank-r
product, scales it in a second pass and adds it in a third, and its backward repeats the pattern
(a scaled copy of the output gradient, a separate sum for the input gradient); on a 4-bit base
it also clones the base output. Here the scaling is folded into a copy of B (r x out values, not
M x out), the low-rank product is accumulated into the base output in place (addmm_), and the
backward accumulates the low-rank input gradient into the base one the same way. On the default
model on a 2-core CPU PEFT's extra passes took about a quarter of a training step; on QLoRA they
also left activation-sized temporaries that made its peak higher than LoRA's.

Used only where it is exactly PEFT's computation: one active plain LoRA adapter (no DoRA, no
dropout, no LoRA bias) on an nn.Linear or a bitsandbytes 4-bit Linear4bit (whose weight is
dequantised for the product, as bitsandbytes' own training path does), adapters enabled and not
merged; anything else (and a 4-bit layer without gradients: generation) runs PEFT's own forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "lora_linear"
LIBRARIES = ("peft", "bitsandbytes")


def base_weight(base, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base's [out, in] weight in `dtype`: as stored, or dequantised from NF4."""
    if type(base) is torch.nn.Linear:
        return base.weight.to(dtype)
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)


class LoRALinear(torch.autograd.Function):
    """x @ W^T (+ bias) + scaling * (x @ A^T) @ B^T, with W (of `base`) frozen; matmuls in x's dtype."""

    @staticmethod
    def forward(ctx, x, base, lora_a, lora_b, scaling: float):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        a, b_scaled = _low_rank(lora_a, lora_b, scaling, x.dtype)
        low = flat @ a.t()  # [M, r]
        bias = base.bias
        out = F.linear(flat, base_weight(base, x.dtype), None if bias is None else bias.to(x.dtype))
        out.addmm_(low, b_scaled.t())
        # The adapter weights, not their casts: the backward casts them again (r x (in + out) values).
        ctx.save_for_backward(flat, low, lora_a, lora_b)
        ctx.base, ctx.scaling, ctx.shape = base, scaling, shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, low, lora_a, lora_b = ctx.saved_tensors
        a, b_scaled = _low_rank(lora_a, lora_b, ctx.scaling, flat.dtype)
        grad = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
        grad_low = grad @ b_scaled  # d(loss)/d(x A^T), scaling included: [M, r]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ base_weight(ctx.base, flat.dtype)
            grad_x.addmm_(grad_low, a)
            grad_x = grad_x.view(ctx.shape)
        grad_a = (grad_low.t() @ flat).to(lora_a.dtype)
        # d/dB of scaling * low @ B^T: scaling * grad^T @ low
        grad_b = (grad.t() @ low).mul_(ctx.scaling).to(lora_b.dtype)
        return grad_x, None, grad_a, grad_b, None


def _low_rank(lora_a, lora_b, scaling: float, dtype):
    """A and scaling * B in the matmul dtype: r x (in + out) values, cheap to make twice."""
    return lora_a.to(dtype), (lora_b * scaling).to(dtype)


def _layer_classes() -> tuple[tuple[type, type], ...]:
    """(PEFT LoRA layer class, the base layer class it wraps) pairs this function reproduces."""
    pairs = []
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return ()
    pairs.append((Linear, torch.nn.Linear))
    try:
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return tuple(pairs)
    pairs.append((Linear4bit, bnb.nn.Linear4bit))
    return tuple(pairs)


def _plain_lora(module) -> bool:
    """True where the module's forward is exactly base(x) + scaling * B(A(x)) for one adapter."""
    if (type(module), type(getattr(module, "base_layer", None))) not in _layer_classes():
        return False
    names = list(module.lora_A.keys())
    if len(names) != 1 or module.lora_variant or getattr(module, "lora_bias", {}).get(names[0], False):
        return False
    if getattr(module.base_layer.bias, "requires_grad", False):
        return False  # a trained bias is PEFT's to handle
    return isinstance(module.lora_dropout[names[0]], torch.nn.Identity) and not getattr(module, "fan_in_fan_out", False)


def _forward(module, original):
    name = next(iter(module.lora_A.keys()))
    base, lora_a, lora_b = module.base_layer, module.lora_A[name], module.lora_B[name]
    quantized = type(base) is not torch.nn.Linear

    def forward(x, *args, **kwargs):
        if (args or kwargs or module.disable_adapters or module.merged or name not in module.active_adapters
                or base.weight.requires_grad or (quantized and not torch.is_grad_enabled())
                or getattr(getattr(base.weight, "quant_state", None), "packing_format_for_cpu", False)):
            return original(x, *args, **kwargs)
        return LoRALinear.apply(x, base, lora_a.weight, lora_b.weight, module.scaling[name])

    return forward


def install(model) -> int:
    """Give every plain PEFT LoRA linear layer of `model` the fused forward; returns how many."""
    patched = 0
    for module in model.modules():
        if _plain_lora(module):
            module.forward = _forward(module, module.forward)
            patched += 1
    return patched
