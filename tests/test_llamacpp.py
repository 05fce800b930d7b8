"""Every family's GGUF loaded by llama.cpp itself (llama-cpp-python, the llamacpp extra; skipped where it
is not installed): f16 logits within 1% of the logit scale of the transformers model's, q8_0 top-1 tokens
equal at >= 99% of answer positions, the K-quant mix q4_k_m written by llama.cpp's quantiser and measured.
Slow set (about 2 minutes); bench/llamacpp_families.py prints the full table."""
from __future__ import annotations

import pytest

from test_family_exports import WRITTEN, family_model, sample
from tunesmith.export import gguf as gguf_export, gguf_check, llamacpp
from tunesmith.export.merge import logits_of

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python (the llamacpp extra) not installed")]


@pytest.mark.parametrize("name", WRITTEN)
def test_family_gguf_in_llama_cpp(family_dirs, tmp_path, name):
    model, tokenizer = family_model(family_dirs, name)
    _, batch = sample(tokenizer, name)
    reference = logits_of(model, batch)
    answers = gguf_check.answer_positions(batch)
    found = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        path = gguf_export.write_gguf(model, tokenizer, tmp_path / f"{quant}.gguf", quant)
        found[quant] = llamacpp.check(path, reference, batch, answers)
    assert found["f16"]["relative_diff"] < 1e-2
    assert found["q8_0"]["top1_agreement"] >= 0.99
    assert found["q4_k_m"]["top1_agreement"] > 0.5  # measured; the bench prints it


@pytest.mark.parametrize("name", WRITTEN)
def test_llama_cpp_tokenizes_rendered_conversations_as_training_does(family_dirs, tmp_path, name):
    """What Ollama and llama-server feed the model: the rendered chat, tokenised by llama.cpp from the file's
    vocabulary (byte-level BPE with its pre-tokenizer regex, or SentencePiece scores), on 56 probe
    conversations (system, multi-turn, tools, reasoning where the family renders them)."""
    from families import probes
    from tunesmith.data.formats import to_example

    model, tokenizer = family_model(family_dirs, name)
    path = gguf_export.write_gguf(model, tokenizer, tmp_path / "f16.gguf")
    conversations = [to_example(r)[1] for r in probes(name, count=56, seed=5)]
    checked, equal = gguf_check.llama_cpp_tokens_parity(path, tokenizer, conversations)
    assert (checked, equal) == (56, 56)


GEMMA3_VARIANTS = {
    # Gemma 3 4B/12B: linear RoPE scaling (factor 8) on the global layers only.
    "4b-linear-rope": dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # Gemma 3 27B: 62 layers, queries scaled by hidden/heads (here 16), not the head size (32); five local
    # layers to each global one.
    "27b-attention-scale": dict(num_hidden_layers=62, query_pre_attn_scalar=16,
                                layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 10 + ["sliding_attention"] * 2),
}


@pytest.mark.parametrize("variant", list(GEMMA3_VARIANTS))
def test_gemma3_sizes_settings_read_by_llama_cpp(family_dirs, tmp_path, variant):
    """What the larger Gemma 3 models set differently from the 1B, read by llama.cpp from the file: f16
    logits within 1% of the transformers model's (RoPE scaling and the query scale act at every position)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from families import FAMILIES, GEMMA_EMBEDDING_SCALE

    _, tokenizer = family_dirs("gemma3")
    settings = dict(FAMILIES["gemma3"].config, **GEMMA3_VARIANTS[variant])
    settings["vocab_size"] = max(settings["vocab_size"], len(tokenizer))
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(GEMMA_EMBEDDING_SCALE)  # as build_aligned_family_model does
    _, batch = sample(tokenizer, "gemma3")
    reference = logits_of(model, batch)
    path = gguf_export.write_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16")
    found = llamacpp.check(path, reference, batch, gguf_check.answer_positions(batch))
    assert found["relative_diff"] < 1e-2


@pytest.mark.parametrize("name", WRITTEN)
def test_family_lora_adapter_applied_by_llama_cpp(family_dirs, tmp_path, name):
    """The LoRA adapter as llama.cpp's GGUF adapter, on every family (Phi's fused q/k/v and gate/up
    included): base GGUF + adapter in llama.cpp give the adapter model's logits within 1%."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunesmith.export.gguf_lora import write_lora_gguf

    base, tokenizer = family_model(family_dirs, name)
    _, batch = sample(tokenizer, name)
    base_path = gguf_export.write_gguf(base, tokenizer, tmp_path / "base.gguf", "f16")
    torch.manual_seed(0)
    tuned = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for module_name, parameter in tuned.named_parameters():
            if "lora_B" in module_name:
                parameter.normal_(0.0, 0.05)
    reference = logits_of(tuned, batch)
    tuned.save_pretrained(tmp_path / "adapter")
    plain, _ = family_model(family_dirs, name)  # get_peft_model wrapped `base` in place
    adapter = write_lora_gguf(plain, tmp_path / "adapter", tmp_path / "adapter.gguf")
    found = llamacpp.check(base_path, reference, batch, gguf_check.answer_positions(batch), lora=adapter)
    assert found["relative_diff"] < 1e-2
    moved = (reference - logits_of(plain, batch)).abs().max() / reference.abs().max()
    assert moved > 0.05  # the adapter changes the logits far beyond the tolerance: an ignored one would fail
