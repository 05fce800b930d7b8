"""accel/cpu/attention.py: the CPU attention from batched matmuls against SDPA, per sequence in
padding-free rows, and in a model."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_same_gradients, demo_examples, lora_model, trainable
from tunesmith.config import AdapterConfig
from tunesmith.data.collate import collate
from tunesmith.models import load_model
from tunesmith.training.loss import label_loss_sum


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.06)])
@pytest.mark.parametrize("mask_kind", ["causal", "padding", "packed"])
def test_matmul_attention_equals_sdpa(dtype, tolerance, mask_kind):
    """The matmul attention against torch's SDPA: outputs and q/k/v gradients, grouped-query
    heads, with no mask (causal), right padding, and a packed block-diagonal mask."""
    from tunesmith.accel.cpu.attention import causal_attention

    generator = torch.Generator().manual_seed(1)
    b, h, kv, s, d = 2, 6, 2, 37, 16

    def make(heads):
        return torch.randn(b, heads, s, d, generator=generator).to(dtype).requires_grad_(True)

    q, k, v = make(h), make(kv), make(kv)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    valid = torch.ones(b, s, dtype=torch.bool)
    mask = None
    if mask_kind == "padding":
        valid[1, 20:] = False
        mask = causal[None, None] & valid[:, None, None, :]
    elif mask_kind == "packed":  # row 0: examples of 15 and 22 tokens
        segment = (torch.arange(s) >= 15).long()
        mask = (causal & (segment[:, None] == segment[None, :]))[None, None].expand(b, 1, s, s)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=True).transpose(1, 2)
    out = causal_attention(q, k, v, mask, d ** -0.5)
    grad = torch.randn(out.shape, generator=generator).to(dtype) * valid[:, :, None, None]
    expected = torch.autograd.grad(reference, (q, k, v), grad)
    got = torch.autograd.grad(out, (q, k, v), grad)
    keep = valid[:, :, None, None]  # outputs at padded positions are never used
    assert ((out - reference).float() * keep).abs().max() < tolerance
    for name, a, e in zip("qkv", got, expected):
        assert (a - e).float().abs().max() < tolerance * max(1.0, float(e.float().abs().max())), name


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.06)])
@pytest.mark.parametrize("block_rows", [7, 10_000])
def test_segmented_attention_equals_sdpa_per_sequence(monkeypatch, dtype, tolerance, block_rows):
    """Sequences end to end in one row, each cut into query blocks (7 rows: 1 to 6 blocks per
    sequence, a sequence of one token) or whole: outputs and q/k/v gradients equal SDPA run on
    each sequence alone, grouped-query heads."""
    from tunesmith.accel.cpu import attention, native

    monkeypatch.setattr(attention, "BLOCK_ROWS", block_rows)
    generator = torch.Generator().manual_seed(2)
    h, kv, d = 6, 2, 16
    bounds = native._bounds_of([23, 5, 40, 1, 9])
    assert len(attention._pieces(bounds, block_rows)) == (12 if block_rows == 7 else 5)

    def make(heads):
        return torch.randn(1, heads, bounds[-1][1], d, generator=generator).to(dtype).requires_grad_(True)

    q, k, v = make(h), make(kv), make(kv)
    out = attention.causal_attention(q, k, v, None, d ** -0.5, bounds)
    reference = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                          enable_gqa=True) for a, b in bounds], 2).transpose(1, 2)
    grad = torch.randn(out.shape, generator=generator).to(dtype)
    expected = torch.autograd.grad(reference, (q, k, v), grad)
    got = torch.autograd.grad(out, (q, k, v), grad)
    assert (out - reference).float().abs().max() < tolerance
    for name, a, e in zip("qkv", got, expected):
        assert (a - e).float().abs().max() < tolerance * max(1.0, float(e.float().abs().max())), name


def test_training_model_runs_the_matmul_attention(tiny_model_dir, tiny_tokenizer):
    """trainable switches a CPU SDPA model to it; the loss is SDPA's; saved configs do not name it."""
    from tunesmith.accel.cpu import attention

    batch = collate(demo_examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    model = lora_model(load_model(str(tiny_model_dir)))
    assert model.config._attn_implementation == attention.NAME
    calls = []
    original = attention.CausalAttention.apply
    attention.CausalAttention.apply = lambda *args: calls.append(1) or original(*args)
    try:
        with torch.no_grad():
            ours, _ = label_loss_sum(model, batch)
    finally:
        attention.CausalAttention.apply = original
    assert len(calls) == model.config.num_hidden_layers
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        theirs, _ = label_loss_sum(model, batch)
    assert torch.allclose(ours, theirs, rtol=1e-5)


@pytest.mark.parametrize("method,dtype,tolerance", [("lora", torch.float32, 1e-5), ("lora", torch.bfloat16, 2e-2),
                                                    ("full", torch.float32, 1e-5)])
def test_padding_free_row_equals_padded_batch(tiny_model_dir, tiny_tokenizer, method, dtype, tolerance):
    """The same examples as one unpadded row (SegmentedAttention keeps them apart) and as a padded
    batch: the same loss, label count and gradients."""
    from tunesmith.accel.cpu import attention
    from tunesmith.data.collate import rounded_up

    examples = demo_examples(tiny_tokenizer, 5)
    model = load_model(str(tiny_model_dir), dtype)
    model = lora_model(model) if method == "lora" else trainable(model, AdapterConfig(method="full"))
    results, calls = [], []
    original = attention.SegmentedAttention.apply
    attention.SegmentedAttention.apply = lambda *args: calls.append(args[3]) or original(*args)
    try:
        for flat in (False, True):
            model.zero_grad(set_to_none=True)
            total, count = label_loss_sum(model, collate(examples, tiny_tokenizer.pad_token_id, flat))
            (total / count).backward()
            grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
            results.append((float(total.detach()), count, grads))
    finally:
        attention.SegmentedAttention.apply = original
    ends = [0]
    for example in examples:
        ends.append(ends[-1] + len(example.input_ids))
    if rounded_up(ends[-1]) > ends[-1]:  # the row is rounded up by a segment of padding
        ends.append(rounded_up(ends[-1]))
    assert calls == [tuple(zip(ends[:-1], ends[1:]))] * model.config.num_hidden_layers
    (padded, padded_count, padded_grads), (flat, flat_count, flat_grads) = results
    assert flat_count == padded_count and abs(flat - padded) / padded < tolerance
    assert padded_grads.keys() == flat_grads.keys()
    assert_same_gradients(padded_grads, flat_grads, tolerance)
