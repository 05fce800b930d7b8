"""The rotary embedding of training forwards as one compiled pass each way.

In transformers' eager code q * cos + rotate_half(q) * sin (and the same for k) is five passes
over q and k forward and about ten backward (slices, a negation, a concatenation, products,
sums): about 6% of a training step of the default model on the CPU. Here the attention modules
of the known families (accel/families.py) run transformers' own forward with one compiled
rotation in place of apply_rotary_pos_emb, where gradients are computed; evaluation and
generation run the original forward.
"""
from __future__ import annotations

import torch

from . import families
from .compile import compiled

NAME = "rotary"
LIBRARIES = ("transformers",)


def _rotate(x, cos, sin):
    """x * cos + rotate_half(x) * sin in fp32, rounded once; rotate_half(x) = (-x2, x1)."""
    half = x.shape[-1] // 2
    xf = x.float()
    return (xf * cos + torch.cat((-xf[..., half:], xf[..., :half]), -1) * sin).to(x.dtype)


def _rotate_transposed(grad, cos, sin):
    """The gradient of _rotate: grad * cos + rotate_half^T(grad * sin), rotate_half^T(y) = (y2, -y1)."""
    half = grad.shape[-1] // 2
    gf = grad.float()
    scaled = gf * sin
    return (gf * cos + torch.cat((scaled[..., half:], -scaled[..., :half]), -1)).to(grad.dtype)


@compiled
def _rotary_forward(q, k, cos, sin):
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@compiled
def _rotary_backward(grad_q, grad_k, cos, sin):
    return _rotate_transposed(grad_q, cos, sin), _rotate_transposed(grad_k, cos, sin)


class Rotary(torch.autograd.Function):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin): q, k [B, H, S, D], cos, sin [B, S, D]
    (constant tables, no gradient). Keeps nothing but the tables, which every layer shares."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        ctx.save_for_backward(cos, sin)
        return _rotary_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        return *_rotary_backward(grad_q, grad_k, cos, sin), None, None


def _patched_attention(module, original):
    """transformers' attention forward of the known classes, with the compiled rotary embedding."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(module).__module__].eager_attention_forward
    llama = type(module).__name__ == "LlamaAttention"  # the one known class without a sliding window

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cos, sin = position_embeddings if position_embeddings is not None else (None, None)
        if cos is None or cos.requires_grad or sin.requires_grad or not torch.is_grad_enabled():
            return original(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        shape = (*hidden_states.shape[:-1], -1, module.head_dim)
        query, key = module.q_proj(hidden_states).view(shape), module.k_proj(hidden_states).view(shape)
        if getattr(module, "q_norm", None) is not None:  # Qwen3: RMSNorm per head before the rotary embedding
            query, key = module.q_norm(query), module.k_norm(key)
        value = module.v_proj(hidden_states).view(shape).transpose(1, 2)
        query, key = Rotary.apply(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        if past_key_values is not None:  # a cache asked for by the caller (training passes use_cache=False)
            key, value = past_key_values.update(key, value, module.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)
        window = getattr(module, "sliding_window", getattr(module.config, "sliding_window", None))
        extra = {} if llama else {"sliding_window": window}
        out, weights = attend(module, query, key, value, attention_mask,
                              dropout=module.attention_dropout if module.training else 0.0, scaling=module.scaling,
                              **extra, **kwargs)
        return module.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights

    return forward


def install(model) -> int:
    """Give the known attention modules of `model` this forward; returns how many."""
    modules = [m for m in families.instances(model, "attention") if hasattr(m, "head_dim")]
    for module in modules:
        module.forward = _patched_attention(module, module.forward)
    return len(modules)
