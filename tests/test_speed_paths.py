"""The fast paths give the results of the plain ones: chunked LM head, bf16 adapters under
autocast, one-tensor collation, fused AdamW. No timings here (bench/train_speed.py has them)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from tunesmith.adapters.lora import apply_adapter
from tunesmith.config import AdapterConfig
from tunesmith.data.collate import collate
from tunesmith.data.packing import pack_examples
from tunesmith.data.tokenize import IGNORE, Encoded, encode
from tunesmith.models import load_model
from tunesmith.training import loss as loss_module
from tunesmith.training.loss import label_loss_sum


def _examples(tokenizer, n=6, seed=3):
    from tunesmith.data.demo import make_splits

    rows = make_splits(n, seed=seed, validation_size=0, test_size=0)["train"]
    return [encode(tokenizer, r["messages"]) for r in rows]


def _full_logits_loss(model, batch) -> torch.Tensor:
    """The plain definition: full-vocabulary logits at every position, summed over label tokens."""
    logits = model(**loss_module.model_inputs(model.config, batch, torch.float32)).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


def _lora(model, seed=0):
    """LoRA on every linear layer (seeded) with B made non-zero, so the adapters change the output."""
    torch.manual_seed(seed)
    model = apply_adapter(model, AdapterConfig(r=4, alpha=8))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def _assert_same_gradients(expected: dict, actual: dict, tolerance: float) -> None:
    """Every gradient of `expected` within `tolerance` of its largest value in `actual`."""
    for name, grad in expected.items():
        scale = grad.abs().max().clamp_min(1e-6)
        assert (actual[name] - grad).abs().max() / scale < tolerance, name


def _chunks_of(monkeypatch, rows: int) -> None:
    monkeypatch.setattr(loss_module, "head_chunk", lambda vocab: rows)


@pytest.mark.parametrize("chunk", [7, 2048])
def test_chunked_head_equals_full_logits(tiny_model_dir, tiny_tokenizer, monkeypatch, chunk):
    """Label positions only, in chunks (a chunk boundary inside a row with chunk 7): same sum as full logits."""
    _chunks_of(monkeypatch, chunk)
    model = load_model(str(tiny_model_dir))
    batch = collate(_examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    total, count = label_loss_sum(model, batch)
    assert count > 2 * 7
    assert torch.allclose(total, _full_logits_loss(model, batch), rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_head_gradients_equal_full_logits(tiny_model_dir, tiny_tokenizer, monkeypatch, method):
    """The head's gradients, computed chunk by chunk in the forward pass, equal autograd's through
    full logits: for the adapters, and for every weight of a full fine-tune (the tied
    embedding/head weight gets its share from both uses)."""
    _chunks_of(monkeypatch, 5)
    batch = collate(_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    grads = []
    for compute in (lambda m: label_loss_sum(m, batch)[0], lambda m: _full_logits_loss(m, batch)):
        model = load_model(str(tiny_model_dir))
        model = _lora(model) if method == "lora" else apply_adapter(model, AdapterConfig(method="full"))
        (compute(model) * 0.5).backward()  # a scale on the output reaches the gradients
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert model.get_output_embeddings().weight.requires_grad == (method == "full")
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-4), name


def test_packed_rows_chunked_equals_full_logits(tiny_model_dir, tiny_tokenizer, monkeypatch):
    _chunks_of(monkeypatch, 11)
    rows, _ = pack_examples(_examples(tiny_tokenizer, 8), 256)
    batch = collate(rows, tiny_tokenizer.pad_token_id)
    model = load_model(str(tiny_model_dir))
    total, _ = label_loss_sum(model, batch)
    assert torch.allclose(total, _full_logits_loss(model, batch), rtol=1e-5)


def test_bf16_adapters_under_autocast_match_fp32(tiny_model_dir, tiny_tokenizer):
    """A bf16 base with fp32 LoRA weights: the fast path (adapter matmuls in bf16, no activation
    casts) gives the loss and LoRA gradients of an all-fp32 model within bf16 rounding, and the
    gradients land on the fp32 master weights."""
    batch = collate(_examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _lora(load_model(str(tiny_model_dir), dtype))
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
    batch = collate(_examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    model = _lora(load_model(str(tiny_model_dir), torch.bfloat16))
    with torch.no_grad():
        fast, _ = label_loss_sum(model, batch)
        monkeypatch.setattr(loss_module, "half_precision_adapters", lambda m, d: contextlib.nullcontext())
        plain, _ = label_loss_sum(model, batch)
    assert abs(float(fast) - float(plain)) / float(plain) < 0.01


def test_fp32_model_takes_no_autocast(tiny_model_dir, tiny_tokenizer):
    """An fp32 model (the deterministic path the reliability tests rely on) is computed exactly as before."""
    model = _lora(load_model(str(tiny_model_dir)))
    assert isinstance(loss_module.half_precision_adapters(model, torch.float32), contextlib.nullcontext)


def test_collate_pads_like_row_by_row(tiny_tokenizer):
    examples = [Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([8], [8]), Encoded([1, 2, 3, 4, 5], [IGNORE] * 4 + [5])]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE], [8] + [IGNORE] * 4, [IGNORE] * 4 + [5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_fused_adamw_step_equals_plain(tiny_model_dir, tiny_tokenizer):
    """The loop's fused AdamW applies the same update as the per-tensor one."""
    batch = collate(_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    weights = []
    for fused in (False, True):
        model = _lora(load_model(str(tiny_model_dir)))
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_and_mlp_equal_transformers(tiny_model_dir, tiny_tokenizer, dtype):
    """training/fused.py: the loss equals the one through transformers' RMSNorm and MLP (in bf16
    within rounding: the compiled kernels round once where eager rounds after every op), the
    gradients of every weight (full fine-tune) match autograd's through the originals, and the
    model really runs the patched functions."""
    from tunesmith.training import fused

    batch = collate(_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    results = []
    for patch in (False, True):
        torch.manual_seed(0)
        model = load_model(str(tiny_model_dir), dtype)
        for p in model.parameters():
            p.requires_grad_(True)
        if patch:  # two norms, the MLP and the attention of every layer, and the final norm
            assert fused.install(model) == 4 * model.config.num_hidden_layers + 1
        total, _ = label_loss_sum(model, batch)
        total.backward()
        results.append((total.detach(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (plain, plain_grads), (lean, lean_grads) = results
    assert torch.allclose(plain, lean, rtol=1e-6 if dtype == torch.float32 else 2e-3)
    _assert_same_gradients(plain_grads, lean_grads, 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_rotary_attention_equals_transformers(tmp_path, tiny_tokenizer, arch, dtype, tolerance):
    """The attention modules' forward with the compiled rotary embedding: transformers' loss and
    the gradients of every weight (full fine-tune, so the rotary backward reaches q_proj, k_proj
    and Qwen3's q/k norms), for each architecture it is installed on; inference (no gradient)
    runs transformers' own forward."""
    from conftest import build_model

    from tunesmith.training import fused

    build_model(tmp_path, arch, vocab=len(tiny_tokenizer), seed=2)
    batch = collate(_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    results, calls = [], []
    original = fused.Rotary.apply
    fused.Rotary.apply = lambda *args: calls.append(1) or original(*args)
    try:
        for patch in (False, True):
            model = load_model(str(tmp_path), dtype)
            model.requires_grad_(True)
            if patch:
                for module in model.modules():
                    if type(module).__name__ in fused.ATTENTIONS:
                        module.forward = fused._patched_attention(module, module.forward)
                with torch.no_grad():
                    label_loss_sum(model, batch)
                assert not calls  # no gradient: transformers' forward
            total, _ = label_loss_sum(model, batch)
            total.backward()
            results.append((total.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    finally:
        fused.Rotary.apply = original
    assert len(calls) == model.config.num_hidden_layers
    (plain, plain_grads), (fast, fast_grads) = results
    assert torch.allclose(plain, fast, rtol=tolerance / 10)
    _assert_same_gradients(plain_grads, fast_grads, tolerance)


def test_fused_functions_keep_fewer_bytes(tiny_model_dir, tiny_tokenizer):
    """The point of the patch: a bf16 LoRA forward keeps less for the backward pass."""
    from tunesmith.training import fused

    batch = collate(_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    kept = []
    for patch in (False, True):
        model = _lora(load_model(str(tiny_model_dir), torch.bfloat16))
        if not patch:  # apply_adapter installed them: put the originals back
            for module in model.modules():
                if type(module).__name__ in fused.RMS_NORMS | fused.MLPS | fused.ATTENTIONS:
                    del module.forward
        sizes = {}

        def pack(tensor):
            sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            label_loss_sum(model, batch)
        kept.append(sum(sizes.values()))
    assert kept[1] < 0.85 * kept[0]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.06)])
@pytest.mark.parametrize("mask_kind", ["causal", "padding", "packed"])
def test_matmul_attention_equals_sdpa(dtype, tolerance, mask_kind):
    """training/attention.py against torch's SDPA: outputs and q/k/v gradients, grouped-query
    heads, with no mask (causal), right padding, and a packed block-diagonal mask."""
    from tunesmith.training.attention import causal_attention

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
    from tunesmith.training import attention, native

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
    """apply_adapter switches a CPU SDPA model to it; the loss is SDPA's; saved configs do not name it."""
    from tunesmith.training import attention

    batch = collate(_examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    model = _lora(load_model(str(tiny_model_dir)))
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


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    """Without a working C++ toolchain torch.compile fails at the first call: the function then
    runs eagerly, with one warning, and keeps giving the same results."""
    from tunesmith.training import fused

    from torch._inductor.exc import InvalidCxxCompiler

    def broken(fn, **kwargs):
        def call(*args):
            raise InvalidCxxCompiler("/nonexistent/g++")  # what inductor raises without a C++ compiler
        return call

    monkeypatch.setattr(torch, "compile", broken)
    square_sum = fused.compiled(lambda x: (x * x).sum())
    x = torch.arange(4.0)
    with pytest.warns(RuntimeWarning, match="InvalidCxxCompiler"):
        assert float(square_sum(x)) == 14.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert float(square_sum(x)) == 14.0


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_lora_layers_equal_peft(tiny_model_dir, tiny_tokenizer, dtype, tolerance):
    """training/lora_linear.py: the same loss, adapter gradients and input gradients as PEFT's
    own forward, on every LoRA layer of the model."""
    from tunesmith.training import lora_linear

    batch = collate(_examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    results = []
    for fused_layers in (False, True):
        model = _lora(load_model(str(tiny_model_dir), dtype))
        patched = [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
        assert len(patched) == 7 * model.config.num_hidden_layers
        if not fused_layers:
            for module in patched:
                del module.forward
        embeddings = model.get_input_embeddings()
        embeddings.weight.requires_grad_(True)  # so the input gradient of the first layer is checked too
        total, _ = label_loss_sum(model, batch)
        total.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        results.append((total.detach().float(), grads))
    (plain, plain_grads), (fast, fast_grads) = results
    assert torch.allclose(plain, fast, rtol=tolerance)
    _assert_same_gradients(plain_grads, fast_grads, tolerance)
    assert lora_linear.install(torch.nn.Linear(3, 3)) == 0


def test_fused_lora_layers_step_aside_where_peft_differs(tiny_model_dir, tiny_tokenizer):
    """Dropout, DoRA and disabled adapters are PEFT's own; a plain layer with adapters disabled
    gives the base model's output."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.training import lora_linear

    model = load_model(str(tiny_model_dir))
    for config in (LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]),
                   LoraConfig(r=4, use_dora=True, target_modules=["q_proj"])):
        assert lora_linear.install(get_peft_model(load_model(str(tiny_model_dir)), config)) == 0
    batch = collate(_examples(tiny_tokenizer, 2), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        base, _ = label_loss_sum(model, batch)
        tuned = _lora(load_model(str(tiny_model_dir)))
        adapted, _ = label_loss_sum(tuned, batch)
        with tuned.disable_adapter():
            disabled, _ = label_loss_sum(tuned, batch)
    assert not torch.allclose(adapted, base)
    assert torch.allclose(disabled, base, rtol=1e-6)


def test_flat_batch_puts_examples_end_to_end():
    from tunesmith.data.collate import flat_batch

    batch = flat_batch([Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([8, 9], [8, 9]), Encoded([1], [1])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1]]
    # each example's first label is dropped: in the row it would be predicted from the previous example
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 6] and "attention_mask" not in batch


def test_budget_cut_fills_few_micro_batches():
    from tunesmith.data.collate import budget_cut

    lengths = [300, 120, 500, 90, 410, 260, 700, 30]
    batches = budget_cut(list(range(8)), lengths, 1024)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in batches)
    assert len(batches) == 3  # 2410 tokens need at least 3 micro-batches of 1024
    assert budget_cut([0, 1], [2000, 10], 1024) == [[0], [1]]  # a longer example goes alone


@pytest.mark.parametrize("method,dtype,tolerance", [("lora", torch.float32, 1e-5), ("lora", torch.bfloat16, 2e-2),
                                                    ("full", torch.float32, 1e-5)])
def test_padding_free_row_equals_padded_batch(tiny_model_dir, tiny_tokenizer, method, dtype, tolerance):
    """The same examples as one unpadded row (SegmentedAttention keeps them apart) and as a padded
    batch: the same loss, label count and gradients."""
    from tunesmith.training import attention

    examples = _examples(tiny_tokenizer, 5)
    model = load_model(str(tiny_model_dir), dtype)
    model = _lora(model) if method == "lora" else apply_adapter(model, AdapterConfig(method="full"))
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
    assert calls == [tuple(zip(ends[:-1], ends[1:]))] * model.config.num_hidden_layers
    (padded, padded_count, padded_grads), (flat, flat_count, flat_grads) = results
    assert flat_count == padded_count and abs(flat - padded) / padded < tolerance
    assert padded_grads.keys() == flat_grads.keys()
    _assert_same_gradients(padded_grads, flat_grads, tolerance)


def test_without_a_cpp_compiler_torch_compile_fails_and_falls_back(tmp_path):
    """The real failure, not a stand-in: inductor with no C++ compiler (and an empty cache) raises
    one of fused.compiler_errors(), so the function runs eagerly with one warning."""
    import os
    import subprocess
    import sys

    script = ("import warnings, torch\n"
              "from tunesmith.training import fused\n"
              "f = fused.compiled(lambda x: (x * 2).sin().sum())\n"
              "with warnings.catch_warnings(record=True) as seen:\n"
              "    warnings.simplefilter('always')\n"
              "    value = float(f(torch.ones(8)))\n"
              "print(round(value, 4), f.state['fast'], [str(w.message).split(';')[0] for w in seen if w.category is RuntimeWarning])\n")
    env = {**os.environ, "CXX": "/nonexistent/g++", "CC": "/nonexistent/gcc",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TUNESMITH_COMPILE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = round(float((torch.ones(8) * 2).sin().sum()), 4)
    assert done.stdout.strip() == f"{expected} False ['torch.compile failed for <lambda>']", done.stdout


@pytest.mark.parametrize("error", ["shape", "memory"])
def test_errors_of_the_function_are_not_taken_for_compiler_failures(error):
    """A shape bug or an out-of-memory error in a compiled function reaches the caller as such, with
    no 'compile failed' warning, and compiling stays on (it used to be turned off for good)."""
    import warnings

    from tunesmith.training import fused

    def product(x, y):
        return x @ y

    def allocate(x):
        raise torch.OutOfMemoryError("CPU out of memory: tried to allocate 80 GiB")

    function = fused.compiled(product if error == "shape" else allocate)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a 'torch.compile failed' warning would raise here
        if error == "shape":
            with pytest.raises(RuntimeError, match="same reduction dim|size mismatch|shapes cannot be multiplied"):
                function(torch.ones(3, 4), torch.ones(5, 6))
            assert function.state["fast"] is not False
            assert torch.equal(function(torch.ones(3, 4), torch.ones(4, 2)), torch.full((3, 2), 4.0))
        else:
            with pytest.raises(torch.OutOfMemoryError):
                function(torch.ones(3))
    assert function.state["fast"] is not False
