"""RMSNorm for training that keeps its input in its own dtype plus one fp32 scale per row.

transformers' RMSNorm upcasts its input to fp32 and autograd keeps that copy (4 bytes per
value); here the input is kept as it came (2 bytes in bf16) and the element-wise arithmetic is
one compiled pass each way (accel/compile.py). Same forward result: normalised in fp32, rounded
to the input's dtype, times the weight.
"""
from __future__ import annotations

import torch

from . import families
from .compile import compiled

NAME = "rmsnorm"
LIBRARIES = ("transformers",)


@compiled
def _norm_forward(x, weight, eps: float):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


@compiled
def _norm_backward(grad, x, rstd, weight):
    # d/dx of weight * x * rstd(x), rstd = (mean(x^2) + eps)^-1/2:  g * rstd - x * rstd^3 * mean(g * x)
    g = (grad * weight).float()
    xf = x.float()
    return (g * rstd - xf * (rstd.pow(3) * (g * xf).mean(-1, keepdim=True))).to(x.dtype)


@compiled
def _norm_weight_grad(grad, x, rstd):
    return (grad * (x.float() * rstd).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32)


class RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)), the normalisation in fp32 and rounded to x's dtype, as transformers does."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = _norm_forward(x, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        grad_weight = _norm_weight_grad(grad, x, rstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return _norm_backward(grad, x, rstd, weight), grad_weight, None


def install(model) -> int:
    """Give the known RMSNorm modules of `model` this forward; returns how many."""
    modules = [m for m in families.instances(model, "norm") if hasattr(m, "variance_epsilon")]
    for module in modules:
        module.forward = (lambda m: lambda x: RMSNorm.apply(x, m.weight, m.variance_epsilon))(module)
    return len(modules)
