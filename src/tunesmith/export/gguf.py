"""Write a merged model as a GGUF file (llama.cpp, Ollama) with the `gguf` package, and verify it.

Tensor names come from gguf's own HF -> GGUF name map, metadata keys from its writer, so the file
reads as llama.cpp's converter would write it: Mistral as the `llama` architecture, the q/k
projections of the `llama` architecture permuted from HF's rotary layout (two halves) into GGML's
(interleaved pairs), Gemma's norms as 1 + weight, the tokenizer as llama.cpp reads it (gguf_vocab.py),
and the chat template that training used.

gguf_check.py reads the file back and verifies it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .gguf_vocab import add_tokenizer

# HF model_type -> GGUF architecture (llama.cpp's converter writes Mistral as llama).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "smollm3": "smollm3",
                 "phi3": "phi3", "gemma3_text": "gemma3"}
# Model types whose GGUF transformers reads back as another model type (Mistral is written as llama).
READ_BACK_AS = {"mistral": "llama"}
# Architectures whose RMS norms scale by (1 + weight): llama.cpp's converter stores weight + 1.
NORM_PLUS_ONE = {"gemma3"}
# Architectures whose q/k rows llama.cpp wants interleaved (its converter's LlamaModel and subclasses).
PERMUTED = {"llama", "smollm3"}
# Architectures whose GGUF transformers refuses to open at all: the checks read them another way.
NOT_READ_BY_TRANSFORMERS = {"smollm3"}
# What the `gguf` package itself can quantise (gguf.quants: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; its K-quants
# raise NotImplementedError), and the K-quant mixes llama.cpp's own quantiser makes from an f16 file.
QUANTS = ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
LLAMA_CPP_QUANTS = ("q4_k_m", "q5_k_m")


def gguf_architecture(config) -> str:
    """The GGUF architecture for a transformers config, or a UserError naming the supported ones."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(f"GGUF export supports the {', '.join(sorted(ARCHITECTURES))} architectures; "
                        f"this model is '{config.model_type}'")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError(f"GGUF export: a {config.model_type} model with attention/MLP biases is not supported")
    for kind, rope in rope_by_layer_type(config).items():
        allowed = ("default",) if kind == "sliding_attention" else ("default", "llama3", "linear")
        if rope.get("rope_type", "default") not in allowed:
            raise UserError(f"GGUF export: rope scaling '{rope.get('rope_type')}' on {kind} layers is not supported "
                            f"({', '.join(allowed)} are)")
    if arch == "gemma3":
        # llama.cpp scales queries by 1/sqrt(head size), or 1/sqrt(hidden/heads) for the 62-layer 27B.
        expected = (config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62
                    else head_size(config))
        if config.query_pre_attn_scalar != expected or config.attn_logit_softcapping:
            raise UserError("GGUF export: this Gemma 3 scales or caps attention scores in a way llama.cpp does not "
                            f"read from the file (query_pre_attn_scalar {config.query_pre_attn_scalar}, llama.cpp "
                            f"uses {expected}; attention softcapping {config.attn_logit_softcapping})")
    return arch


def head_size(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_by_layer_type(config) -> dict[str, dict]:
    """RoPE parameters per attention type: Gemma 3 has its own for sliding and full attention layers."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return rope
    return {"full_attention": rope}


def rope_factors(config) -> np.ndarray | None:
    """Llama 3 RoPE scaling as llama.cpp reads it: a `rope_freqs` tensor dividing each frequency,
    taken from transformers' own scaled frequencies (plain RoPE: None)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    dim = head_size(config)
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return (plain / scaled.float()).numpy().astype(np.float32)


def rope_to_ggml(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF stores each head's rotary dims as two halves; GGML's llama kernel wants them interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_names(model, arch: str):
    """(HF name, GGUF name) of every weight the file holds, from gguf's own HF -> GGUF name map."""
    import gguf

    config = model.config
    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(by_name[arch], config.num_hidden_layers)
    for hf_name in model.state_dict():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output is absent
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None:
            raise UserError(f"GGUF export: no GGUF name for weight '{hf_name}'")
        yield hf_name, f"{name}.{suffix}"


def gguf_tensors(model, arch: str):
    """(GGUF name, fp32 array) for every weight, in llama.cpp's naming and layout."""
    config = model.config
    state = model.state_dict()
    for hf_name, full_name in gguf_names(model, arch):
        name = full_name.rsplit(".", 1)[0]
        tensor = state[hf_name].detach().float()
        if arch in PERMUTED and name.endswith("attn_q"):
            tensor = rope_to_ggml(tensor, config.num_attention_heads)
        elif arch in PERMUTED and name.endswith("attn_k"):
            tensor = rope_to_ggml(tensor, config.num_key_value_heads)
        elif arch in NORM_PLUS_ONE and name.endswith("norm"):
            tensor = tensor + 1.0
        yield full_name, tensor.numpy()


def add_tensor(writer, name: str, data: np.ndarray, quant: str) -> None:
    """Norms and biases stay f32 (as llama.cpp keeps them); matrices become f16 or the quantised type
    (rows whose length is not a multiple of the 32-value block stay f16, as llama.cpp falls back too).
    The token embedding and output head of a 4/5-bit file are q8_0, as llama.cpp's own mixes keep them
    at more bits than the rest."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    kind = quant
    if quant not in ("f16", "q8_0") and name.split(".")[0] in ("token_embd", "output"):
        kind = "q8_0"
    if data.ndim == 1:
        writer.add_tensor(name, data.astype(np.float32))
    elif kind != "f16" and data.shape[-1] % 32 == 0:
        qtype = getattr(GGMLQuantizationType, kind.upper())
        writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def check_quant(quant: str) -> None:
    """A quantisation this machine can write, or a UserError (before anything is merged)."""
    if quant in LLAMA_CPP_QUANTS:
        from . import llamacpp

        if not llamacpp.available():
            raise UserError(f"GGUF {quant}: the gguf package cannot write K-quants (no encoder for them); install "
                            "the llamacpp extra (llama-cpp-python) to have llama.cpp's quantiser write it, or use "
                            f"one of {', '.join(QUANTS)}")
    elif quant not in QUANTS:
        raise UserError(f"GGUF export: unknown --quant '{quant}'; choose one of {', '.join(QUANTS + LLAMA_CPP_QUANTS)}")


def write_gguf(model, tokenizer, path: Path, quant: str = "f16", name: str = "model") -> Path:
    """Write `model` (a transformers causal LM, fp32) and its tokenizer as one GGUF file.

    K-quant mixes (q4_k_m, q5_k_m) are written as f16 and quantised by llama.cpp's own quantiser: the
    `gguf` package has no K-quant encoder (gguf.quants.quantize raises NotImplementedError for them)."""
    import gguf

    check_quant(quant)
    if quant in LLAMA_CPP_QUANTS:
        from . import llamacpp

        f16 = write_gguf(model, tokenizer, path.with_name(path.stem + ".f16.gguf"), "f16", name)
        llamacpp.quantize(f16, path, quant)
        f16.unlink()
        return path
    config = model.config
    arch = gguf_architecture(config)
    head_dim = head_size(config)
    rope = rope_by_layer_type(config)["full_attention"]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(int(head_dim * getattr(config, "partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":  # Gemma 3 4B and larger, on their global layers
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    add_sliding_window(writer, config)
    if getattr(config, "final_logit_softcapping", None):  # Gemma
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    factors = rope_factors(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    for tensor_name, data in gguf_tensors(model, arch):
        add_tensor(writer, tensor_name, data, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_sliding_window(writer, config) -> None:
    """Gemma 3's local layers: the window, which layers have it (llama.cpp otherwise assumes every sixth
    layer is global) and their own RoPE base."""
    layer_types = getattr(config, "layer_types", None) or []
    if config.model_type != "gemma3_text" or "sliding_attention" not in layer_types:
        return
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
    local = rope_by_layer_type(config).get("sliding_attention", {})
    writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))


def rope_from_ggml(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of rope_to_ggml."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
