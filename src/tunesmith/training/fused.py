"""Leaner, faster RMSNorm and SwiGLU for training: same forward results, fewer tensors kept.

transformers' RMSNorm upcasts its input to fp32 and autograd keeps that copy (4 bytes per
value), and its MLP keeps gate, SiLU(gate) and up for the product. Here RMSNorm keeps its input
in its own dtype plus one fp32 scale per row, and SwiGLU keeps gate and up and recomputes the
SiLU in backward: on the default model in bf16 (LoRA, 4 x 489 tokens) 300 MiB less of the
1.27 GiB autograd kept.

Their element-wise arithmetic is compiled by torch.compile (inductor, dynamic shapes) into one
loop each: in eager mode these two took 0.64 s of a 2.5 s forward + backward of the default
model (4 x 400 tokens), 8 to 40 passes over memory each; compiled, 0.06 s. Compiling takes about
15 s once per process (cached on disk after). Where it fails (no C++ compiler, an unsupported
platform) the same functions run eagerly, after one warning.

Only the module classes listed are patched: their forward is known to be exactly this
computation.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

RMS_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}
MLPS = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"}
SILU = {"SiLU", "SiLUActivation"}


def compiled(fn):
    """fn compiled on first use; eager from then on if compiling fails (or TUNESMITH_COMPILE=0)."""
    state = {"fast": None if os.environ.get("TUNESMITH_COMPILE", "1") != "0" else False}

    def call(*args):
        if state["fast"] is None:
            state["fast"] = torch.compile(fn, dynamic=True)
        if state["fast"]:
            try:
                return state["fast"](*args)
            except Exception as err:  # noqa: BLE001 (any compiler failure: fall back, keep training)
                warnings.warn(f"torch.compile failed for {fn.__name__}; running it eagerly ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})", RuntimeWarning, stacklevel=2)
                state["fast"] = False
        return fn(*args)

    return call


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


@compiled
def _swiglu_forward(gate, up):
    return F.silu(gate) * up


@compiled
def _swiglu_backward(grad, gate, up):
    return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


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


def _patched_norm(module):
    return lambda x: RMSNorm.apply(x, module.weight, module.variance_epsilon)


def _patched_mlp(module):
    return lambda x: module.down_proj(SwiGLU.apply(module.gate_proj(x), module.up_proj(x)))


def install(model) -> int:
    """Patch the known RMSNorm and SiLU-MLP modules of `model` in place; returns how many."""
    patched = 0
    for module in model.modules():
        name = type(module).__name__
        if name in RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = _patched_norm(module)
            patched += 1
        elif name in MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU:
            module.forward = _patched_mlp(module)
            patched += 1
    return patched
