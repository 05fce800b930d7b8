"""A padding-free row goes through the model without a mask (accel/rows.py): transformers neither
looks for packing on the device (a host synchronisation per forward on a GPU) nor builds a row x row
mask; the fast paths' attention keeps the sequences apart from cu_seq_lens, one sequence at a time
where their kernels do not apply (here: a sliding window shorter than the sequences, on the CPU)."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_same_gradients, demo_examples, loss_and_grads, seeded_lora, trainable
from tunesmith import accel
from tunesmith.config import AdapterConfig
from tunesmith.data.collate import collate
from tunesmith.models import load_model
from tunesmith.training.loss import label_loss_sum


def test_a_padding_free_forward_leaves_packing_detection_and_masks_to_no_one(tiny_model_dir, tiny_tokenizer,
                                                                             monkeypatch):
    from transformers import masking_utils

    def refuse(*args, **kwargs):
        raise AssertionError("transformers prepared a mask for a padding-free row")

    model = trainable(load_model(str(tiny_model_dir)), AdapterConfig(r=4))
    assert accel.padding_free(model)
    batch = collate(demo_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id, flat=True)
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", refuse)
    monkeypatch.setattr(masking_utils, "sdpa_mask", refuse)
    total, count = label_loss_sum(model, batch)
    assert count > 0 and torch.isfinite(total)


@pytest.mark.parametrize("window", [6, "longest", 4096])
def test_a_sliding_window_shorter_than_the_sequences_runs_per_sequence_and_equals_the_plain_path(
        tmp_path, tiny_tokenizer, monkeypatch, window):
    """Mistral with a window of 6 positions (shorter than every example: SDPA per sequence), as long
    as the longest example (shorter than the row: still the fast attention) or longer than all: the
    fast paths on a padding-free row give the loss and gradients of plain transformers + peft on
    a padded batch, whose sliding-window mask transformers builds."""
    from transformers import MistralConfig, MistralForCausalLM

    from tunesmith.accel.cpu import attention as cpu_attention

    examples = demo_examples(tiny_tokenizer, 4)
    if window == "longest":
        window = max(len(e.input_ids) for e in examples)
        monkeypatch.setattr(cpu_attention, "per_sequence_sdpa", None)  # the fast path must not step aside
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=window, tie_word_embeddings=True, eos_token_id=2, pad_token_id=2)
    MistralForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    assert min(len(e.input_ids) for e in examples) > 6
    results = []
    for fast in (True, False):
        model = seeded_lora(tmp_path, torch.float32, "cpu", fast)
        assert accel.padding_free(model) == fast
        results.append(loss_and_grads(model, collate(examples, tiny_tokenizer.pad_token_id, flat=fast)))
    (fast_loss, fast_grads), (plain_loss, plain_grads) = results
    assert abs(fast_loss - plain_loss) / plain_loss < 1e-5
    assert_same_gradients(plain_grads, fast_grads, 1e-5)


def tiny_model_of(folder, model_type: str, **settings):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{
        "vocab_size": 97, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None, **settings})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder, safe_serialization=True)
    return folder


def random_examples(lengths, vocab: int, seed: int = 0):
    from tunesmith.data.tokenize import IGNORE, Encoded

    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        out.append(Encoded(ids, [IGNORE] * (n // 3) + ids[n // 3:]))
    return out


@pytest.mark.parametrize("name", ["llama3", "qwen2.5", "qwen3", "gemma3", "phi3", "mistral", "smollm3"])
def test_every_padding_free_family_equals_plain_padded_batches(name, tmp_path):
    """The families whose batches go as padding-free rows (accel.families.PADDING_FREE_TYPES), as
    tests/families.py shapes them (Gemma 3's sliding and full layers, Phi-3's fused projections,
    SmolLM3's layers without RoPE): the same loss and LoRA gradients as plain transformers + peft."""
    from families import FAMILIES

    from tunesmith.accel.families import PADDING_FREE_TYPES

    settings = dict(FAMILIES[name].config)
    model_type, vocab = settings.pop("model_type"), 160
    settings.update(vocab_size=vocab, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    assert model_type in PADDING_FREE_TYPES
    folder = tiny_model_of(tmp_path, model_type, **settings)
    examples = random_examples([5, 19, 40, 2, 27], vocab)
    results = []
    for fast in (True, False):
        model = seeded_lora(folder, torch.float32, "cpu", fast)
        assert accel.padding_free(model) == fast
        results.append(loss_and_grads(model, collate(examples, 0, flat=fast)))
    (fast_loss, fast_grads), (plain_loss, plain_grads) = results
    assert abs(fast_loss - plain_loss) / plain_loss < 1e-5
    assert_same_gradients(plain_grads, fast_grads, 1e-4)


def test_other_architectures_keep_padded_batches_through_the_fast_attention(tmp_path):
    """StableLM's decoder layers do not pass a row's bounds to the attention (a padding-free row failed
    at step 1), and DeepSeek-V3's attention has values of another head size (MLA: its padded forward
    came out scrambled): both keep padded batches, which the fast attention leaves as plain SDPA gives."""
    for model_type, settings in (("stablelm", {}), ("deepseek_v3", dict(
            q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
            n_group=1, topk_group=1, num_key_value_heads=4))):
        folder = tiny_model_of(tmp_path / model_type, model_type, **settings)
        fast, plain = seeded_lora(folder, torch.float32, "cpu", True), seeded_lora(folder, torch.float32, "cpu", False)
        assert fast.config._attn_implementation != "sdpa" and not accel.padding_free(fast)
        ids = torch.randint(2, 97, (2, 48), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(fast(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5), model_type
        batch = collate(random_examples([5, 19, 30], 97), 0)
        assert loss_and_grads(fast, batch)[0] == pytest.approx(loss_and_grads(plain, batch)[0], rel=1e-5)


@pytest.mark.parametrize("model_type, settings", [
    ("mistral", dict(sliding_window=4)),
    ("gemma3_text", dict(sliding_window=4, head_dim=32, query_pre_attn_scalar=32, num_key_value_heads=1,
                         layer_types=["sliding_attention", "full_attention"])),
])
def test_packed_rows_keep_the_sliding_window(model_type, settings, tmp_path):
    """transformers takes a packed row's 4D mask as it is: examples longer than the window trained
    with full attention in the sliding layers (and were evaluated, unpacked, with the window)."""
    from tunesmith.data.packing import pack_examples

    folder = tiny_model_of(tmp_path, model_type, **settings)
    examples = random_examples([10, 14, 7], 97)
    rows, _ = pack_examples(examples, 64)
    assert len(rows) == 1  # the three examples in one row
    for fast in (True, False):
        model = seeded_lora(folder, torch.float32, "cpu", fast)
        packed, padded = loss_and_grads(model, collate(rows, 0)), loss_and_grads(model, collate(examples, 0))
        assert packed[0] == pytest.approx(padded[0], rel=1e-5)
