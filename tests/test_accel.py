"""The fast-path layer (accel/) as a whole, and the run's device.

- fast paths against `fast_paths=off` (plain transformers + peft) on tiny Llama, Qwen2 and
  Mistral models: the same loss and LoRA gradients;
- the rewrites are keyed by class and pinned to checked library versions, falling back with one
  warning;
- the CUDA backend's attention logic (run here through its SDPA fallback) against the plain path;
- device resolution, checkpoints loaded onto the model's device, RNG states restored; tests that
  need CUDA skip without it (bench/gpu_check.sh runs them on a GPU).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from helpers import (assert_same_gradients, build_model, demo_examples, loss_and_grads,
                     relative_difference, seeded_lora, trainable)
from tunesmith import accel
from tunesmith.accel import compat
from tunesmith.config import AdapterConfig
from tunesmith.data.collate import collate
from tunesmith.device import resolve, to_device
from tunesmith.errors import UserError
from tunesmith.models import load_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (bench/gpu_check.sh runs it on one)")
DEVICE = torch.device("cuda", 0) if CUDA else torch.device("cpu")  # what resolve("auto") gives on rank 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_paths_equal_plain_transformers_and_peft(tmp_path, tiny_tokenizer, arch, dtype):
    """The same examples as a padding-free row through the fast paths and as a padded batch
    through plain transformers + peft: the same loss and LoRA gradients. In fp32 within 1e-5. In
    bf16 the loss within 1e-3; the gradients differ by bf16 rounding, 0.3-0.5% of their norm (the
    issue's bar of 0.1% is missed): transformers' own eager and SDPA attention, on the same padded
    batch, differ from each other by as much (0.30% Llama, 0.36% Qwen2), so the fast path is held
    to 1.5 times that spread, and to being no farther from the fp32 gradients than the plain path."""
    build_model(tmp_path, arch, vocab=len(tiny_tokenizer), seed=3)
    examples = demo_examples(tiny_tokenizer, 5)
    flat = to_device(collate(examples, tiny_tokenizer.pad_token_id, flat=True), DEVICE)
    padded = to_device(collate(examples, tiny_tokenizer.pad_token_id), DEVICE)
    fast = seeded_lora(tmp_path, dtype, DEVICE, fast=True)
    plain = seeded_lora(tmp_path, dtype, DEVICE, fast=False)
    assert accel.padding_free(fast) and not accel.padding_free(plain)
    fast_loss, fast_grads = loss_and_grads(fast, flat)
    plain_loss, plain_grads = loss_and_grads(plain, padded)
    assert fast_grads.keys() == plain_grads.keys() and all("lora_" in name for name in fast_grads)
    if dtype == torch.float32:
        assert abs(fast_loss - plain_loss) / plain_loss < 1e-5
        assert_same_gradients(plain_grads, fast_grads, 1e-5)
        return
    assert abs(fast_loss - plain_loss) / plain_loss < 1e-3
    eager = seeded_lora(tmp_path, dtype, DEVICE, fast=False)
    eager.set_attn_implementation("eager")
    _, eager_grads = loss_and_grads(eager, padded)
    spread = relative_difference(eager_grads, plain_grads)  # between transformers' own attention implementations
    assert spread < 1e-2
    assert relative_difference(fast_grads, plain_grads) <= 1.5 * max(spread, 1e-3)
    _, exact = loss_and_grads(seeded_lora(tmp_path, torch.float32, DEVICE, fast=False), padded)
    assert relative_difference(fast_grads, exact) <= 1.25 * relative_difference(plain_grads, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounding_a_row_up_changes_no_loss_or_gradient(tiny_model_dir, tiny_tokenizer, dtype):
    """The padding segment that rounds a padding-free row up (data/collate.py rounded_up) attends
    only to itself and has no label: the same loss and LoRA gradients as the row without it."""
    examples = demo_examples(tiny_tokenizer, 5)
    exact = to_device(collate(examples, tiny_tokenizer.pad_token_id, flat=True, step=1), DEVICE)
    rounded = to_device(collate(examples, tiny_tokenizer.pad_token_id, flat=True), DEVICE)
    assert rounded["input_ids"].shape[1] > exact["input_ids"].shape[1]
    exact_loss, exact_grads = loss_and_grads(seeded_lora(tiny_model_dir, dtype, DEVICE, fast=True), exact)
    rounded_loss, rounded_grads = loss_and_grads(seeded_lora(tiny_model_dir, dtype, DEVICE, fast=True), rounded)
    assert abs(rounded_loss - exact_loss) / exact_loss < (1e-6 if dtype == torch.float32 else 1e-3)
    assert relative_difference(rounded_grads, exact_grads) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_apply_rewrites_known_classes_and_off_rewrites_nothing(tiny_model_dir):
    model = trainable(load_model(str(tiny_model_dir)), fast_paths=False)
    layers = model.config.num_hidden_layers
    assert accel.apply(model, torch.device("cpu"), "off") == {}
    assert model.config._attn_implementation == "sdpa"
    applied = accel.apply(model, torch.device("cpu"), "auto")
    assert applied == {"rmsnorm": 2 * layers + 1, "swiglu": layers, "rotary": layers, "lora_linear": 7 * layers,
                       "tunesmith_causal": 1}
    assert "rmsnorm x5" in accel.describe(applied, "auto", torch.device("cpu"))


def test_an_unknown_architecture_trains_on_the_plain_path(tmp_path, tiny_tokenizer):
    """A family the rewrites do not know (a subclass of a known class counts as unknown: its
    forward may differ) gets no rewrite, and says so."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    class OtherNorm(modeling_llama.LlamaRMSNorm):
        pass

    build_model(tmp_path, "llama", vocab=len(tiny_tokenizer))
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    for layer in model.model.layers:
        layer.input_layernorm.__class__ = OtherNorm
    applied = accel.apply(trainable(model, fast_paths=False), torch.device("cpu"))
    assert applied["rmsnorm"] == model.config.num_hidden_layers + 1  # the post-attention norms and the final one


def test_a_library_outside_its_checked_range_falls_back_with_one_warning(tiny_model_dir, monkeypatch):
    real = compat.version_of
    monkeypatch.setattr(compat, "version_of", lambda lib: "99.0.0" if lib == "peft" else real(lib))
    compat.usable.cache_clear()
    try:
        model = trainable(load_model(str(tiny_model_dir)), fast_paths=False)
        with pytest.warns(RuntimeWarning, match="fast path 'lora_linear' not applied: peft 99.0.0") as caught:
            applied = accel.apply(model, torch.device("cpu"))
            accel.apply(trainable(load_model(str(tiny_model_dir)), fast_paths=False), torch.device("cpu"))
        assert "lora_linear" not in applied and "rmsnorm" in applied  # the transformers rewrites still apply
        assert sum("lora_linear" in str(w.message) for w in caught) == 1
    finally:
        compat.usable.cache_clear()


def test_installed_versions_are_the_checked_ones_or_the_fast_paths_step_aside(tiny_model_dir):
    """Upgrading transformers, peft or bitsandbytes past the range the fast paths were checked on
    must turn them off (until they are checked again and CHECKED is widened), never run them
    silently on internals that may have changed."""
    model = trainable(load_model(str(tiny_model_dir)), fast_paths=False)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        applied = accel.apply(model, torch.device("cpu"))
    for name, libraries in {"rmsnorm": ("transformers",), "lora_linear": ("peft",)}.items():
        inside = all(compat.within_checked(lib) for lib in libraries)
        assert (name in applied) == inside, (name, [compat.version_of(lib) for lib in libraries])
    assert {p.library for p in compat.PRIVATE_NAMES} <= set(compat.CHECKED) | {"torch"}


def test_pins_in_pyproject_match_the_checked_ranges():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    pins = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    for library, (oldest, newest) in compat.CHECKED.items():
        assert f"{library}>={oldest},<={newest}" in pins, library


def test_cuda_backend_attention_equals_the_plain_path(tiny_model_dir, tiny_tokenizer):
    """accel/cuda/attention.py's logic on a padding-free row (its SDPA-per-sequence path, which
    runs where no varlen kernel does) gives the plain path's loss and gradients."""
    from tunesmith.accel.cuda import attention as cuda_attention

    examples = demo_examples(tiny_tokenizer, 4)
    results = []
    for install in (False, True):
        torch.manual_seed(0)
        model = trainable(load_model(str(tiny_model_dir)), fast_paths=False)
        if install:
            assert cuda_attention.install(model) == 1
        batch = collate(examples, tiny_tokenizer.pad_token_id, flat=install)
        results.append(loss_and_grads(model, batch))
    (plain, plain_grads), (varlen, varlen_grads) = results
    assert abs(plain - varlen) / plain < 1e-5
    assert_same_gradients(plain_grads, varlen_grads, 1e-5)
    assert cuda_attention.kernel_name(torch.device("cpu"), torch.bfloat16) == "sdpa"


def test_per_sequence_sdpa_keeps_sequences_apart_with_a_sliding_window():
    from tunesmith.accel.cuda.attention import per_sequence_sdpa

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, n, 8, generator=generator) for n in (4, 2, 2))
    ends = [0, 5, 12]
    out = per_sequence_sdpa(q, k, v, ends, 8 ** -0.5, window=3)
    # the second sequence alone gives the same rows: nothing leaks across the boundary
    alone = per_sequence_sdpa(q[5:], k[5:], v[5:], [0, 7], 8 ** -0.5, window=3)
    assert torch.allclose(out[5:], alone, atol=1e-6)
    # a window of 3: row 6 of the second sequence sees rows 4-6 only
    changed = v.clone()
    changed[5 + 2] += 10.0
    assert torch.allclose(per_sequence_sdpa(q, k, changed, ends, 8 ** -0.5, window=3)[5 + 6], out[5 + 6], atol=1e-6)


def test_device_resolution():
    assert resolve("cpu") == torch.device("cpu")
    assert resolve("auto", local_rank=0) == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(UserError, match="train.device"):
            resolve(bad)
    if not CUDA:
        with pytest.raises(UserError, match="no CUDA device"):
            resolve("cuda")


def test_one_named_gpu_for_every_rank_of_a_machine_is_refused(monkeypatch):
    """train.device=cuda:0 under `torchrun --nproc 2` put both ranks on GPU 0 (NCCL refuses a GPU twice,
    after the model loaded); said before anything loads, with or without CUDA here."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="every rank of this machine on one GPU"):
        resolve("cuda:0", local_rank=1)
    assert resolve("cpu") == torch.device("cpu")  # the CPU ranks share it (gloo)


@needs_cuda
def test_cuda_resolution_takes_the_local_rank():
    assert resolve("cuda", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(UserError, match="only"):
        resolve(f"cuda:{torch.cuda.device_count()}")


def test_checkpoint_loads_onto_the_models_device_and_restores_rng(tiny_model_dir, tmp_path):
    from tunesmith.training import checkpoint as ckpt
    from tunesmith.training.schedule import warmup_cosine

    def parts():
        model = trainable(load_model(str(tiny_model_dir), device=DEVICE), AdapterConfig(r=4))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return model, optimizer, warmup_cosine(optimizer, 10, 1, 0.1)

    model, optimizer, scheduler = parts()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    optimizer.step()
    torch.manual_seed(123)
    if CUDA:
        torch.cuda.manual_seed(456)
    saved = ckpt.save_checkpoint(tmp_path, model, optimizer, scheduler, ckpt.TrainState(step=3), keep=2)
    expected = (torch.rand(3), torch.rand(3, device=DEVICE))
    torch.manual_seed(0)
    if CUDA:
        torch.cuda.manual_seed(0)
    fresh, fresh_optimizer, fresh_scheduler = parts()
    state = ckpt.load_checkpoint(saved, fresh, fresh_optimizer, fresh_scheduler)
    assert state.step == 3
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, device=DEVICE), expected[1])
    moments = [s["exp_avg"] for s in fresh_optimizer.state.values()]
    assert moments and all(m.device == DEVICE for m in moments)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


def test_checkpoint_rng_follows_where_offloaded_shards_compute(tiny_model_dir, tmp_path, monkeypatch):
    """FSDP2 shards offloaded to host memory (train.fsdp_offload) have CPU parameters but draw their
    dropout on the run's device: that device's RNG is the one saved and restored."""
    from tunesmith import device as devices
    from tunesmith.training import checkpoint as ckpt
    from tunesmith.training.schedule import warmup_cosine

    model = trainable(load_model(str(tiny_model_dir)), AdapterConfig(r=4))
    model._tunesmith_device = torch.device("cuda", 3)  # as training.distributed records it at shard time
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = warmup_cosine(optimizer, 10, 1, 0.1)
    seen = []
    monkeypatch.setattr(devices, "rng_states", lambda device: seen.append(("saved", device)) or {"torch_rng": torch.get_rng_state()})
    monkeypatch.setattr(devices, "set_rng_states", lambda states, device: seen.append(("restored", device)))
    saved = ckpt.save_checkpoint(tmp_path, model, optimizer, scheduler, ckpt.TrainState(step=1), keep=2)
    ckpt.load_checkpoint(saved, model, optimizer, scheduler)
    assert seen and all(device == torch.device("cuda", 3) for _, device in seen), seen
    assert {what for what, _ in seen} == {"saved", "restored"}


def test_train_eval_and_generation_keep_every_tensor_on_the_models_device(tiny_config, monkeypatch):
    """Base evaluation, training, eval loss and generation: no module ever receives a tensor
    (positional or keyword) on another device than its own weights. On CUDA this catches batches,
    masks or position ids left on the host; on the CPU it runs the same checks."""
    import tunesmith

    seen: list[str] = []
    real_apply = accel.apply

    def check(module, args, kwargs):
        weights = next(module.parameters(), None)  # a block's own or its first layer's: one device per model
        if weights is not None:
            for value in list(args) + list(kwargs.values()):
                if isinstance(value, torch.Tensor):
                    assert value.device == weights.device, (type(module).__name__, value.device, weights.device)
            seen.append(type(module).__name__)

    def apply_and_guard(model, device, setting="auto"):
        for module in model.modules():
            module.register_forward_pre_hook(check, with_kwargs=True)
        return real_apply(model, device, setting)

    monkeypatch.setattr(accel, "apply", apply_and_guard)
    tiny_config["train"].update(max_steps=3, device=str(DEVICE))
    tiny_config["eval"].update(every_steps=2, test_limit=2, max_new_tokens=4)
    results = tunesmith.train(tiny_config)
    assert results["device"] == str(DEVICE)
    assert {"Embedding", "Linear", "LlamaRMSNorm", "LlamaDecoderLayer", "LlamaAttention"} <= set(seen)
