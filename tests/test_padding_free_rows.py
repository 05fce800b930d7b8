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
