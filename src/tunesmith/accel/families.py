"""The transformers module classes whose forward the fast paths know exactly, by family.

Rewrites are keyed by these classes (exact types, not subclasses and not class-name strings):
a family is added here once its RMSNorm, SiLU MLP and attention forward have been read and
checked against the rewrites (tests/test_accel.py runs each rewrite against the plain forward).
"""
from __future__ import annotations

import functools


# The same families by transformers' model_type, for what sees a model's config only (`tunesmith plan`).
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Families whose micro-batches go as padding-free rows: their decoder layers hand the row's bounds
# (cu_seq_lens) to the attention, and nothing else in them mixes positions. Checked against plain
# padded batches in tests/test_padding_free_rows.py. Other models keep padded batches: StableLM's
# and Nemotron's layers drop the bounds, and a hybrid's Mamba, convolution or linear-attention
# layers (LFM2, Granite 4 H, Bamba, Jamba) would carry one example into the next.
PADDING_FREE_TYPES = MODEL_TYPES + ("gemma3_text", "phi3", "smollm3")


@functools.lru_cache(maxsize=1)
def known() -> dict[str, tuple[type, ...]]:
    """{"norm": RMSNorm classes, "mlp": gated MLP classes, "silu": SiLU activations,
    "attention": Llama-style attention classes}."""
    import torch
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralAttention, MistralMLP, MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP, Qwen2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3MLP, Qwen3RMSNorm

    return {
        "norm": (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm),
        "mlp": (LlamaMLP, MistralMLP, Qwen2MLP, Qwen3MLP),
        "silu": (torch.nn.SiLU, SiLUActivation),  # the MLP activations whose gate is SiLU
        # Their forward: q/k/v projections, optional per-head q/k norms (Qwen3), the rotary
        # embedding, the registered attention function, o_proj. All but Llama pass a sliding window.
        "attention": (LlamaAttention, MistralAttention, Qwen2Attention, Qwen3Attention),
    }


def instances(model, kind: str):
    """The modules of `model` whose exact type is a known class of `kind`."""
    classes = known()[kind]
    return [m for m in model.modules() if type(m) in classes]


def covered(model) -> bool:
    """Whether the model's decoder layers are of a known family (some known attention module)."""
    return bool(instances(model, "attention"))
