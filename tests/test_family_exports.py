"""GGUF exports of every family whose vocabulary tunesmith writes (byte-level BPE), read back and
compared with the model: f16 logits within 1% of the logit scale, q8_0 top-1 tokens >= 99% at answer
positions, the GGUF's own tokenizer and chat template building the training prompts token for token.
Gemma 3 and Phi-3 (SentencePiece-style vocabularies) are refused with the reason."""
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

WRITTEN = ["llama3", "qwen2.5", "qwen3", "mistral", "smollm2", "smollm3"]
ARCH = {"llama3": "llama", "qwen2.5": "qwen2", "qwen3": "qwen3", "mistral": "llama", "smollm2": "llama",
        "smollm3": "smollm3"}


def family_model(family_dirs, name: str):
    from transformers import AutoModelForCausalLM

    folder, tokenizer = family_dirs(name)
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
# cores): SmolLM2's 49k vocabulary runs with `make test`, the others in the slow set.
CASES = [pytest.param(name, quant, marks=() if name == "smollm2" else pytest.mark.slow)
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
def test_sentencepiece_style_families_are_refused_with_the_reason(family_dirs, tmp_path, name):
    model, tokenizer = family_model(family_dirs, name)
    with pytest.raises(UserError, match="GGUF export"):
        gguf_export.write_gguf(model, tokenizer, tmp_path / "x.gguf")


def test_k_quants_name_what_writes_them(family_dirs, tmp_path):
    model, tokenizer = family_model(family_dirs, "smollm2")
    with pytest.raises(UserError, match="q4_k_m"):
        gguf_export.write_gguf(model, tokenizer, tmp_path / "x.gguf", "q4_k_m")
