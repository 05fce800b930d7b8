"""GGUF exports of every family whose vocabulary tunesmith writes (byte-level BPE), read back and
compared with the model: f16 logits within 1% of the logit scale, q8_0 top-1 tokens >= 99% at answer
positions, the GGUF's own tokenizer and chat template building the training prompts token for token.
Phi-4 is written as llama.cpp's `phi3` architecture (fused q/k/v and gate/up). Gemma 3 and Phi-3
(SentencePiece-style vocabularies) are refused with the reason."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from families import FAMILIES, build_family_model, probes
from tunesmith.data.collate import collate
from tunesmith.data.formats import to_example
from tunesmith.data.tokenize import encode_many, use_template
from tunesmith.errors import UserError
from tunesmith.export import gguf as gguf_export
from tunesmith.export.merge import logits_of

WRITTEN = ["llama3", "qwen2.5", "qwen3", "mistral", "smollm2", "smollm3", "phi4"]
ARCH = {"llama3": "llama", "qwen2.5": "qwen2", "qwen3": "qwen3", "mistral": "llama", "smollm2": "llama",
        "smollm3": "smollm3", "phi4": "phi3"}


def family_model(family_dirs, name: str):
    from transformers import AutoModelForCausalLM

    folder, tokenizer = family_dirs(name)
    folder = folder / "aligned"  # its own: other tests save an unaligned model beside the tokenizer
    if not (folder / "config.json").exists():
        model = build_family_model(name, folder, tokenizer, seed=1)
        if not model.config.tie_word_embeddings:  # a trained head is aligned with the embeddings
            with torch.no_grad():
                model.lm_head.weight.copy_(model.model.embed_tokens.weight)
            model.save_pretrained(folder, safe_serialization=True)
    use_template(tokenizer, None, FAMILIES[name].variables)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tokenizer


def sample(tokenizer, name: str, count: int = 8):
    conversations = [to_example(r)[1] for r in probes(name, count=count, seed=7)]
    examples = [e for result in encode_many(tokenizer, conversations) for e in result]
    return conversations, collate(examples, tokenizer.pad_token_id)


# transformers reads a GGUF's tokenizer and weights slowly (about 2 minutes for a 128k vocabulary on 2
# cores): SmolLM2's 49k vocabulary in f16 runs with `make test`, the rest in the slow set but not in CI's
# (tests/test_llamacpp.py checks every family's f16 and q8_0 files there, in llama.cpp).
CASES = [pytest.param(name, quant, marks=() if (name, quant) == ("smollm2", "f16") else (pytest.mark.slow, pytest.mark.long))
         for name in WRITTEN for quant in ("f16", "q8_0")]


@pytest.mark.parametrize("name,quant", CASES)
def test_family_gguf_reads_back_with_the_models_logits_and_prompts(family_dirs, tmp_path, name, quant):
    from gguf import GGUFReader

    model, tokenizer = family_model(family_dirs, name)
    conversations, batch = sample(tokenizer, name)
    reference = logits_of(model, batch)
    path = gguf_export.write_gguf(model, tokenizer, tmp_path / f"{name}.gguf", quant)
    check = gguf_export.verify_gguf(path, quant, reference, batch, tokenizer, conversations, model.config)
    if quant == "f16":
        assert check.relative_diff < 1e-2
    assert check.top1_agreement >= 0.99 and check.positions > 50
    assert check.prompts_equal == check.prompts_checked == len(conversations)
    reader = GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == ARCH[name]
    names = {t.name for t in reader.tensors}
    assert ("rope_freqs.weight" in names) == (name == "llama3")  # Llama 3's RoPE scaling
    assert ("blk.0.attn_q_norm.weight" in names) == (name == "qwen3")
    assert ("output.weight" in names) == (not model.config.tie_word_embeddings)


@pytest.mark.parametrize("name", ["gemma3", "phi3"])
def test_families_gguf_does_not_write_yet_are_refused_with_the_reason(family_dirs, tmp_path, name):
    model, tokenizer = family_model(family_dirs, name)
    with pytest.raises(UserError, match="GGUF export"):
        gguf_export.write_gguf(model, tokenizer, tmp_path / "x.gguf")


def test_k_quants_come_from_llama_cpp_or_are_refused_with_the_reason(family_dirs, tmp_path, monkeypatch):
    from gguf import GGUFReader

    from tunesmith.export import llamacpp

    model, tokenizer = family_model(family_dirs, "smollm2")
    if llamacpp.available():
        path = gguf_export.write_gguf(model, tokenizer, tmp_path / "x.gguf", "q4_k_m")
        assert {t.tensor_type.name for t in GGUFReader(str(path)).tensors} - {"F32"}  # quantised by llama.cpp
        assert not (tmp_path / "x.f16.gguf").exists()
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    with pytest.raises(UserError, match="cannot write K-quants.*llamacpp extra"):
        gguf_export.write_gguf(model, tokenizer, tmp_path / "y.gguf", "q4_k_m")


OLLAMA = {"smollm2": "chatml", "qwen2.5": "chatml", "qwen3": "chatml", "qwen3-nothink": "chatml-no-think",
          "llama3": "llama3.1", "mistral": "mistral-nemo", "gemma3": "gemma3", "phi3": "phi3", "phi4": "phi4"}


@pytest.mark.parametrize("name", list(OLLAMA))
def test_ollama_template_renders_the_training_prompts(family_dirs, name):
    """>= 50 probe conversations (system, multi-turn; no tools: Ollama's tool schemas are outside these
    templates): the Go template's render (with llama.cpp's BOS) equals the training prompt tokens."""
    from tunesmith.data.tokenize import encode
    from tunesmith.export.gguf import adds_bos
    from tunesmith.export.ollama import choose_template, served_tokens, template_default_system

    _, tokenizer = family_dirs(name)
    use_template(tokenizer, None, FAMILIES[name].variables)
    records = [r for r in probes(name, count=120, seed=11) if "tools" not in r and "<think>" not in str(r)][:50]
    prompts = [r["messages"][:-1] for r in records]
    family, template = choose_template(tokenizer, adds_bos(tokenizer), prompts)
    assert family == OLLAMA[name] and len(prompts) == 50
    for record, prompt in zip(records, prompts):
        trained = encode(tokenizer, to_example(record)[1])  # the last answer, after its served prompt
        served = served_tokens(tokenizer, template, prompt, template_default_system(tokenizer), adds_bos(tokenizer))
        assert trained.input_ids[:len(served)] == served and trained.labels[len(served)] != -100


@pytest.mark.parametrize("name", ["smollm3"])
def test_ollama_refuses_a_family_it_has_no_template_for(family_dirs, name):
    from tunesmith.export.ollama import choose_template

    _, tokenizer = family_dirs(name)
    use_template(tokenizer, None, FAMILIES[name].variables)
    with pytest.raises(UserError, match="no Ollama template"):
        choose_template(tokenizer, False)
