"""The gated MLP down(silu(gate(x)) * up(x)) keeping gate and up only, SiLU recomputed backward.

transformers' MLP keeps gate, SiLU(gate) and up for the product; here the product is one
compiled pass forward and one backward (accel/compile.py), and SiLU(gate) is never stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import families
from .compile import compiled

NAME = "swiglu"
LIBRARIES = ("transformers",)


@compiled
def _swiglu_forward(gate, up):
    return F.silu(gate) * up


@compiled
def _swiglu_backward(grad, gate, up):
    return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return _swiglu_backward(grad, gate, up)


def install(model) -> int:
    """Give the known SiLU MLP modules of `model` this forward; returns how many."""
    silu = families.known()["silu"]
    modules = [m for m in families.instances(model, "mlp") if type(getattr(m, "act_fn", None)) in silu]
    for module in modules:
        module.forward = (lambda m: lambda x: m.down_proj(SwiGLU.apply(m.gate_proj(x), m.up_proj(x))))(module)
    return len(modules)
