"""GGUF exports of every family, read back and compared with the model: f16 logits within 1% of the logit
scale, q8_0 top-1 tokens >= 99% at answer positions, the GGUF's own tokenizer and chat template building
the training prompts token for token. Byte-level BPE vocabularies are written as llama.cpp's `gpt2`
model, Phi-3's and Gemma 3's SentencePiece-style ones as its scored `llama` model; Phi-3 and Phi-4 as
the `phi3` architecture (fused q/k/v and gate/up), Gemma 3 as `gemma3` (norms stored as 1 + weight,
its sliding-window layers and their RoPE base)."""
from __future__ import annotations

import pytest
import torch

from families import EXPORTED, FAMILIES, build_aligned_family_model, probes
from tunesmith.data.collate import collate
from tunesmith.data.formats import to_example
from tunesmith.data.templates import use_template
from tunesmith.data.tokenize import encode_many
from tunesmith.errors import UserError
from tunesmith.export import gguf as gguf_export, gguf_check
from tunesmith.export.merge import logits_of

WRITTEN = EXPORTED
ARCH = {"llama3": "llama", "qwen2.5": "qwen2", "qwen3": "qwen3", "mistral": "llama", "smollm2": "llama",
        "smollm3": "smollm3", "phi4": "phi3", "phi3": "phi3", "gemma3": "gemma3"}


def family_model(family_dirs, name: str):
    from transformers import AutoModelForCausalLM

    folder, tokenizer = family_dirs(name)
    folder = folder / "aligned"  # its own: other tests save an unaligned model beside the tokenizer
    if not (folder / "config.json").exists():
        build_aligned_family_model(name, folder, tokenizer)
    use_template(tokenizer, None, FAMILIES[name].variables)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tokenizer


def sample(tokenizer, name: str, count: int = 8):
    conversations = [to_example(r)[1] for r in probes(name, count=count, seed=7)]
    examples = [e for result in encode_many(tokenizer, conversations) for e in result]
    return conversations, collate(examples, tokenizer.pad_token_id)


# transformers reads a GGUF's tokenizer and weights slowly (about 2 minutes for a 128k vocabulary on 2
# cores): SmolLM2's 49k and Phi-3's 32k vocabularies in f16 run with `make test`, the rest in the slow set but not in CI's
# (tests/test_llamacpp.py checks every family's f16 and q8_0 files there, in llama.cpp).
CASES = [pytest.param(name, quant, marks=() if (name, quant) in (("smollm2", "f16"), ("phi3", "f16")) else pytest.mark.long)
         for name in WRITTEN for quant in ("f16", "q8_0")]


@pytest.mark.parametrize("name,quant", CASES)
def test_family_gguf_reads_back_with_the_models_logits_and_prompts(family_dirs, tmp_path, name, quant):
    from gguf import GGUFReader

    model, tokenizer = family_model(family_dirs, name)
    conversations, batch = sample(tokenizer, name)
    reference = logits_of(model, batch)
    path = gguf_export.write_gguf(model, tokenizer, tmp_path / f"{name}.gguf", quant)
    check = gguf_check.verify_gguf(path, quant, reference, batch, tokenizer, conversations, model.config)
    if quant == "f16":
        assert check.relative_diff < 1e-2
    assert check.top1_agreement >= 0.99 and check.positions > 50
    assert check.prompts_equal == check.prompts_checked == len(conversations)
    reader = GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == ARCH[name]
    names = {t.name for t in reader.tensors}
    assert ("rope_freqs.weight" in names) == (name == "llama3")  # Llama 3's RoPE scaling
    assert ("blk.0.attn_q_norm.weight" in names) == (name in ("qwen3", "gemma3"))  # their q/k norms
    assert ("output.weight" in names) == (not model.config.tie_word_embeddings)


@pytest.mark.parametrize("name,space_prefix", [("phi3", True), ("gemma3", False)])
def test_sentencepiece_vocabularies_are_written_as_llama_cpp_reads_them(family_dirs, tmp_path, name, space_prefix):
    """Phi-3 and Gemma 3 keep SentencePiece's scored vocabulary: llama.cpp merges the pair whose joined
    piece scores highest, so each piece scores minus the rank of the first merge making it; bytes,
    control and user-defined tokens are typed as llama.cpp's converter types them."""
    import json

    from gguf import GGUFReader, TokenType

    model, tokenizer = family_model(family_dirs, name)
    path = gguf_export.write_gguf(model, tokenizer, tmp_path / "x.gguf")
    fields = GGUFReader(str(path)).fields
    tokens, scores = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert bool(fields["tokenizer.ggml.add_space_prefix"].contents()) is space_prefix
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    ids = tokenizer.get_vocab()
    for rank in (0, 1, 100, len(merges) // 2, len(merges) - 1):
        left, right = merges[rank]
        merged = ids[left + right]
        if merged not in tokenizer.added_tokens_decoder:
            assert scores[merged] >= -rank  # its first merge is at this rank or before
    ranked = [ids[a + b] for a, b in merges[:200] if ids[a + b] not in tokenizer.added_tokens_decoder]
    assert [scores[i] for i in ranked] == sorted((scores[i] for i in ranked), reverse=True)
    assert types[ids["<0x0A>"]] == TokenType.BYTE and tokens[ids["<0x0A>"]] == "<0x0A>"
    assert types[tokenizer.eos_token_id] == TokenType.CONTROL
    spaces = [i for i, a in tokenizer.added_tokens_decoder.items() if not a.special and set(a.content) == {"\u2581"}]
    assert all(types[i] == TokenType.USER_DEFINED and tokens[i] == " " * len(tokens[i]) for i in spaces)
    assert bool(spaces) is (name == "gemma3")  # Gemma's runs of spaces are added tokens, matched in raw text


def test_a_tokenizer_that_is_not_bpe_is_refused_with_the_reason(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0)], 0)))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(UserError, match="supports BPE tokenizers.*Unigram"):
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
          "llama3": "llama3.1", "mistral": "mistral-nemo", "gemma3": "gemma3", "phi3": "phi3", "phi4": "phi4",
          "smollm3": "smollm3", "smollm3-nothink": "smollm3-no-think"}
OTHER_MODE = {"smollm3-nothink": ("smollm3", {"enable_thinking": False})}  # a family in its other mode


@pytest.mark.parametrize("case", list(OLLAMA))
def test_ollama_template_renders_the_training_prompts(family_dirs, case):
    """>= 50 probe conversations (system, multi-turn; no tools: Ollama's tool schemas are outside these
    templates): the Go template's render (with llama.cpp's BOS) equals the training prompt tokens."""
    from tunesmith.data.tokenize import encode
    from tunesmith.export.gguf_vocab import adds_bos
    from tunesmith.export.ollama import choose_template, default_system, served_tokens
    from tunesmith.models import load_tokenizer

    name, variables = OTHER_MODE[case] if case in OTHER_MODE else (case, FAMILIES[case].variables)
    folder, tokenizer = family_dirs(name)
    if case in OTHER_MODE:  # its own copy: the template variables are written into the tokenizer's template
        tokenizer = load_tokenizer(str(folder))
    use_template(tokenizer, None, variables)
    records = [r for r in probes(name, count=120, seed=11) if "tools" not in r and "<think>" not in str(r)][:50]
    prompts = [r["messages"][:-1] for r in records]
    family, template = choose_template(tokenizer, adds_bos(tokenizer), prompts)
    assert family == OLLAMA[case] and len(prompts) == 50
    for record, prompt in zip(records, prompts):
        trained = encode(tokenizer, to_example(record)[1])  # the last answer, after its served prompt
        served = served_tokens(tokenizer, template, prompt, default_system(family, tokenizer), adds_bos(tokenizer))
        assert trained.input_ids[:len(served)] == served and trained.labels[len(served)] != -100

