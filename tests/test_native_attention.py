"""accel/cpu/native.py: the C attention kernel for padding-free rows against SDPA, in the model,
and the fallback to accel/cpu/attention.py's matmuls where it cannot be built. Skipped where the
processor has no AVX512-BF16 or there is no C compiler (the matmul path is tested everywhere)."""
import pytest
import torch
import torch.nn.functional as F

from tunesmith.accel.cpu import attention, native


def _needs_kernel(head_dim: int) -> None:
    if not native.supported(torch.bfloat16, head_dim) or native.kernel(head_dim) is None:
        pytest.skip("no AVX512-BF16 processor or no C compiler here")


def _save_kernel_model(folder, tokenizer):
    """A tiny Llama whose heads are 64 wide (the kernel's smallest size), saved to `folder`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, eos_token_id=2,
                         pad_token_id=2, bos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return config


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """An empty kernel cache and forgotten choices, before and after the test."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    native.kernel.cache_clear()
    saved = dict(native._decided)
    native._decided.clear()
    yield
    native.kernel.cache_clear()
    native._decided.clear()
    native._decided.update(saved)


@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_kernel_equals_sdpa_per_sequence(head_dim, heads, kv_heads):
    """Outputs and q/k/v gradients of sequences end to end in one row (a 1-token sequence, lengths
    that fill no tile, one of several tiles) equal fp32 SDPA on each sequence alone, within bf16
    rounding; grouped and plain heads."""
    _needs_kernel(head_dim)
    generator = torch.Generator().manual_seed(3)
    bounds = native._bounds_of([1, 7, 33, 100, 64, 290])
    tokens = bounds[-1][1]

    def make(n):
        return torch.randn(1, tokens, n, head_dim, generator=generator).to(torch.bfloat16).transpose(1, 2)

    q, k, v = (make(n).requires_grad_(True) for n in (heads, kv_heads, kv_heads))
    grad = torch.randn(1, tokens, heads, head_dim, generator=generator).to(torch.bfloat16)
    scale = head_dim ** -0.5
    out = native.NativeSegmentedAttention.apply(q, k, v, bounds, scale, heads // kv_heads)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    exact = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    reference = torch.cat([F.scaled_dot_product_attention(*(x[:, :, a:b] for x in exact), is_causal=True,
                                                          enable_gqa=True) for a, b in bounds], 2).transpose(1, 2)
    expected = (reference, *torch.autograd.grad(reference, exact, grad.float()))
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert a.dtype == torch.bfloat16 and a.shape == e.shape, name
        assert (a.float() - e).abs().max() < 0.03 * max(1.0, float(e.abs().max())), name


def test_kernel_first_loaded_without_gradients(fresh_native):
    """Building and self-checking the kernel where autograd is off (as inside an autograd
    function's forward, or under torch.no_grad) still passes the check and gives the kernel."""
    if not native.supported(torch.bfloat16, 64):
        pytest.skip("no AVX512-BF16 processor or no C compiler here")
    with torch.no_grad():
        assert native.kernel(64) is not None


def test_model_runs_the_kernel_and_agrees_with_the_matmuls(tmp_path, tiny_tokenizer, monkeypatch):
    """A bf16 LoRA model with 64-wide heads on a padding-free row: every layer runs the kernel,
    and loss and adapter gradients match accel/cpu/attention.py's matmul path."""
    from helpers import assert_same_gradients, demo_examples, lora_model
    from tunesmith.data.collate import collate
    from tunesmith.models import load_model
    from tunesmith.training.loss import label_loss_sum

    _needs_kernel(64)
    config = _save_kernel_model(tmp_path, tiny_tokenizer)
    batch = collate(demo_examples(tiny_tokenizer, 5), tiny_tokenizer.pad_token_id, flat=True)
    calls, results = [], []
    original = native.NativeSegmentedAttention.apply
    monkeypatch.setattr(native.NativeSegmentedAttention, "apply", lambda *a: calls.append(1) or original(*a))
    for use_kernel in (True, False):
        monkeypatch.setattr(native, "chosen", (lambda *a: True) if use_kernel else (lambda *a: False))
        model = lora_model(load_model(str(tmp_path), torch.bfloat16))
        total, count = label_loss_sum(model, batch)
        (total / count).backward()
        results.append((float(total.detach()), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}))
    assert len(calls) == config.num_hidden_layers
    (fast, fast_grads), (plain, plain_grads) = results
    assert abs(fast - plain) / plain < 0.01
    assert_same_gradients(plain_grads, fast_grads, 0.05)


@pytest.mark.parametrize("setting", ["1", "auto"])
def test_first_choice_inside_a_checkpointed_forward(fresh_native, tmp_path, tiny_tokenizer, monkeypatch, setting):
    """The kernel is built, checked and timed at the first padding-free forward, here inside
    gradient checkpointing's first pass: that work stays out of the checkpointed graph (its
    recomputation would otherwise find a different number of saved tensors)."""
    from helpers import demo_examples
    from helpers import trainable
    from tunesmith.config import AdapterConfig
    from tunesmith.data.collate import collate
    from tunesmith.models import load_model
    from tunesmith.training.loss import label_loss_sum

    _needs_kernel(64)
    native.kernel.cache_clear()  # built again below, into this test's cache folder
    monkeypatch.setenv("TUNESMITH_NATIVE", setting)
    _save_kernel_model(tmp_path / "model", tiny_tokenizer)
    model = trainable(load_model(str(tmp_path / "model"), torch.bfloat16),
                          AdapterConfig(method="full", gradient_checkpointing=True))
    model.train()
    total, count = label_loss_sum(model, collate(demo_examples(tiny_tokenizer, 3), tiny_tokenizer.pad_token_id, flat=True))
    (total / count).backward()
    assert native._decided == {(2, 1, 64): native._decided[(2, 1, 64)]}
    assert native._decided[(2, 1, 64)] or setting == "auto"
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_without_a_working_compiler_the_matmuls_run(fresh_native, monkeypatch):
    """A compiler that fails: one warning, no kernel, and causal_attention takes the matmul path."""
    if not {"avx512f", "avx512bw", "avx512_bf16"} <= native._cpu_flags():
        pytest.skip("the kernel is not attempted on this processor")
    monkeypatch.setenv("CC", "false")
    assert native.supported(torch.bfloat16, 64)  # a compiler is there; it just fails
    with pytest.warns(RuntimeWarning, match="native CPU attention unavailable"):
        assert not native.chosen(6, 2, 64, attention.SegmentedAttention)
    ran = []
    original = attention.SegmentedAttention.apply
    monkeypatch.setattr(attention.SegmentedAttention, "apply", lambda *a: ran.append(1) or original(*a))
    q = torch.randn(1, 6, 20, 64).to(torch.bfloat16)
    k, v = (torch.randn(1, 2, 20, 64).to(torch.bfloat16) for _ in range(2))
    attention.causal_attention(q, k, v, None, 0.125, ((0, 12), (12, 20)))
    assert ran == [1]


def test_kernel_is_off_where_asked_or_unsupported(monkeypatch):
    assert not native.supported(torch.float32, 64)
    assert not native.supported(torch.bfloat16, 80)
    monkeypatch.setenv("TUNESMITH_NATIVE", "0")
    assert not native.supported(torch.bfloat16, 64)
