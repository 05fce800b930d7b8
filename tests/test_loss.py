"""training/loss.py: the chunked label-only LM head and bf16 adapters under autocast give the
results of the plain computation (full logits, fp32 PEFT); fused AdamW gives the plain update.
No timings here (bench/train_speed.py has them)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from helpers import demo_examples, full_logits_loss, lora_model, trainable
from tunesmith.config import AdapterConfig
from tunesmith.data.collate import collate
from tunesmith.data.packing import pack_examples
from tunesmith.models import load_model
from tunesmith.training import loss as loss_module
from tunesmith.training.loss import label_loss_sum


def _chunks_of(monkeypatch, rows: int) -> None:
    monkeypatch.setattr(loss_module, "head_chunk", lambda vocab, device="cpu": rows)


@pytest.mark.parametrize("chunk", [7, 2048])
def test_chunked_head_equals_full_logits(tiny_model_dir, tiny_tokenizer, monkeypatch, chunk):
    """Label positions only, in chunks (a chunk boundary inside a row with chunk 7): same sum as full logits."""
    _chunks_of(monkeypatch, chunk)
    model = load_model(str(tiny_model_dir))
    batch = collate(demo_examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    total, count = label_loss_sum(model, batch)
    assert count > 2 * 7
    assert torch.allclose(total, full_logits_loss(model, batch), rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_head_gradients_equal_full_logits(tiny_model_dir, tiny_tokenizer, monkeypatch, method):
    """The head's gradients, computed chunk by chunk in the forward pass, equal autograd's through
    full logits: for the adapters, and for every weight of a full fine-tune (the tied
    embedding/head weight gets its share from both uses)."""
    _chunks_of(monkeypatch, 5)
    batch = collate(demo_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    grads = []
    for compute in (lambda m: label_loss_sum(m, batch)[0], lambda m: full_logits_loss(m, batch)):
        model = load_model(str(tiny_model_dir))
        model = lora_model(model) if method == "lora" else trainable(model, AdapterConfig(method="full"))
        (compute(model) * 0.5).backward()  # a scale on the output reaches the gradients
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert model.get_output_embeddings().weight.requires_grad == (method == "full")
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-4), name


def test_packed_rows_chunked_equals_full_logits(tiny_model_dir, tiny_tokenizer, monkeypatch):
    _chunks_of(monkeypatch, 11)
    rows, _ = pack_examples(demo_examples(tiny_tokenizer, 8), 256)
    batch = collate(rows, tiny_tokenizer.pad_token_id)
    model = load_model(str(tiny_model_dir))
    total, _ = label_loss_sum(model, batch)
    assert torch.allclose(total, full_logits_loss(model, batch), rtol=1e-5)


def test_bf16_adapters_under_autocast_match_fp32(tiny_model_dir, tiny_tokenizer):
    """A bf16 base with fp32 LoRA weights: the fast path (adapter matmuls in bf16, no activation
    casts) gives the loss and LoRA gradients of an all-fp32 model within bf16 rounding, and the
    gradients land on the fp32 master weights."""
    batch = collate(demo_examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = lora_model(load_model(str(tiny_model_dir), dtype))
        total, count = label_loss_sum(model, batch)
        (total / count).backward()
        lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in lora.values())
        results[dtype] = (float(total.detach() / count), {n: p.grad for n, p in lora.items()})
    (exact, exact_grads), (fast, fast_grads) = results[torch.float32], results[torch.bfloat16]
    assert abs(fast - exact) / exact < 0.01
    for name, grad in exact_grads.items():
        cosine = F.cosine_similarity(grad.flatten(), fast_grads[name].flatten(), dim=0)
        assert cosine > 0.98, (name, float(cosine))


def test_bf16_fast_path_equals_peft_plain_path(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """The fast path and PEFT's own (fp32 adapter matmuls with casts) agree on a bf16 base."""
    batch = collate(demo_examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    model = lora_model(load_model(str(tiny_model_dir), torch.bfloat16))
    with torch.no_grad():
        fast, _ = label_loss_sum(model, batch)
        monkeypatch.setattr(loss_module, "half_precision_adapters", lambda m, d: contextlib.nullcontext())
        plain, _ = label_loss_sum(model, batch)
    assert abs(float(fast) - float(plain)) / float(plain) < 0.01


def test_fp32_model_takes_no_autocast(tiny_model_dir, tiny_tokenizer):
    """An fp32 model (the deterministic path the reliability tests rely on) is computed exactly as before."""
    model = lora_model(load_model(str(tiny_model_dir)))
    assert isinstance(loss_module.half_precision_adapters(model, torch.float32), contextlib.nullcontext)


def test_fused_adamw_step_equals_plain(tiny_model_dir, tiny_tokenizer):
    """The loop's fused AdamW applies the same update as the per-tensor one."""
    batch = collate(demo_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    weights = []
    for fused in (False, True):
        model = lora_model(load_model(str(tiny_model_dir)))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2, fused=fused)
        for _ in range(3):
            total, count = label_loss_sum(model, batch)
            (total / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        weights.append([p.detach().clone() for p in params])
    for plain, fused in zip(*weights):
        assert torch.allclose(plain, fused, atol=1e-6)
