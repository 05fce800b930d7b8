"""tunesmith plan: the memory breakdown against real tensors, and against published GPU measurements."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tunesmith.config import validate
from tunesmith.plan import (GiB, Setup, estimate, estimate_on, format_plan, model_shape, plan, setup_from_config,
                            utilisation_of)
from tunesmith.plan.devices import GPUS, HEADROOM, Device
from tunesmith.plan.memory import adapter_params, weight_bytes
from tunesmith.plan.shapes import LINEARS, shape_from_dict
from tunesmith.plan.speed import flops_per_token

GB = 1e9


def saved_tensor_bytes(model, batch) -> int:
    """Bytes autograd keeps for the backward pass of tunesmith's loss (each storage once, weights excluded)."""
    from tunesmith.training.loss import label_loss_sum

    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        label_loss_sum(model, batch)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in seen.items() if ptr not in weights)


@pytest.mark.parametrize("method,dtype,targets", [
    ("full", "float32", LINEARS),
    ("full", "bfloat16", LINEARS),  # fp32 master weights under bf16 autocast
    ("lora", "float32", LINEARS),
    ("lora", "bfloat16", LINEARS), ("lora", "bfloat16", ("q_proj", "v_proj")), ("lora", "float32", ("down_proj",)),
])
def test_activation_terms_match_the_tensors_autograd_keeps(tiny_model_dir, method, dtype, targets):
    from helpers import trainable
    from tunesmith.config import AdapterConfig
    from tunesmith.models import load_model

    model = load_model(str(tiny_model_dir), getattr(torch, dtype))
    model = trainable(model, AdapterConfig(method=method, target_modules=list(targets)))
    model.train()
    batch_size, seq = 3, 96
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :40] = -100  # 56 of the 95 next-token targets carry a label
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    kept = saved_tensor_bytes(model, batch)

    from tunesmith.accel.cpu.attention import NAME

    cpu_attention = model.config._attn_implementation == NAME  # accel/cpu/attention.py: also keeps its causal mask
    setup = Setup(method=method, dtype=dtype, batch=batch_size, seq=seq, targets=targets, label_share=56 / seq,
                  cpu_attention=cpu_attention)
    est = estimate(model_shape(str(tiny_model_dir)), setup)
    predicted = est.activations_no_ckpt + est.kept_by_head + est.weight_copies
    assert predicted == pytest.approx(kept, rel=0.02)


# Parameter counts in billions as the hub gives them (its safetensors totals, rounded as shown there).
PUBLISHED = {"llama-3.1-8b": "8.03", "llama-3.1-70b": "70.6", "llama-3.2-1b": "1.24", "llama-3.2-3b": "3.21",
             "llama-2-7b": "6.74", "mistral-7b": "7.25", "tinyllama-1.1b": "1.1", "qwen2.5-0.5b": "0.494",
             "qwen2.5-1.5b": "1.54", "qwen2.5-3b": "3.09", "qwen2.5-7b": "7.62", "qwen2.5-14b": "14.8",
             "qwen2.5-32b": "32.8", "qwen2.5-72b": "72.7", "qwen3-0.6b": "0.6", "qwen3-1.7b": "1.7", "qwen3-4b": "4.02",
             "qwen3-8b": "8.19", "qwen3-14b": "14.8", "qwen3-32b": "32.8"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_shapes_have_their_published_sizes(name, monkeypatch):
    """A shipped shape (plans offline) holds as many weights as the hub says, to the digits it shows
    (and 0.2% for the biases and norms a shape leaves out): a mistyped width, head count or head
    size is off by more. Its hub id reads the same shape, with no hub to ask."""
    from tunesmith.plan.shapes import ALIASES

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shape = model_shape(name)
    shown = PUBLISHED[name]
    rounding = 0.5 * 10 ** -len(shown.partition(".")[2])
    assert abs(shape.total_params / 1e9 - float(shown)) <= rounding + 0.002 * float(shown)
    assert model_shape(ALIASES[name]) == shape.__class__(**{**shape.__dict__, "name": ALIASES[name]})


def test_parameter_counts_match_the_real_model_and_peft(tiny_model_dir):
    from helpers import trainable
    from tunesmith.config import AdapterConfig
    from tunesmith.models import load_model

    shape = model_shape(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), torch.float32)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert weight_bytes(shape, Setup(method="full", dtype="float32")) == 4 * shape.total_params
    lora = trainable(model, AdapterConfig(method="lora", r=4, target_modules=["q_proj", "down_proj"]))
    trained = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert adapter_params(shape, Setup(r=4, targets=("q_proj", "down_proj"))) == trained


def test_breakdown_parts_hold_what_they_name_and_the_printed_plan_agrees(tiny_model_dir):
    """Parts that do not depend on the moment of the peak, from what AdamW and PEFT keep (a trained
    weight: its fp32 value, one fp32 gradient, AdamW's two fp32 moments), on the real model's counts."""
    from helpers import trainable
    from tunesmith.config import AdapterConfig
    from tunesmith.models import load_model

    shape = model_shape(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), torch.float32)
    all_weights = sum(p.numel() for p in model.parameters())
    adapters = sum(p.numel() for p in trainable(model, AdapterConfig(method="lora", r=16, target_modules="all-linear"))
                   .parameters() if p.requires_grad)
    for method in ("full", "lora", "qlora"):
        trained = all_weights if method == "full" else adapters
        for ckpt in (False, True):
            setup = Setup(method=method, gradient_checkpointing=ckpt, batch=4, seq=256, r=16, targets=tuple(LINEARS))
            est = estimate_on(shape, setup, GPUS["l4"])
            assert est.parts["optimizer states"] == 2 * 4 * trained, (method, ckpt)
            assert est.parts["adapter weights"] == (0 if method == "full" else 4 * adapters)
            assert 0 <= est.parts["gradients"] <= 4 * trained + 4 * shape.hidden, (method, ckpt)
            assert est.parts["activations"] > 0 or est.parts["working memory"] > 0
            assert est.parts["framework overhead"] == GPUS["l4"].overhead(estimate(shape, setup).total) > 0
    text = format_plan(plan(shape, Setup(method="lora", batch=4, seq=256), include_this_machine=False))
    printed = {line.split()[0]: float(line.split()[-2]) for line in text.splitlines()
               if line.startswith("  ") and line.rstrip().endswith("GiB")}
    total = printed.pop("total")
    assert sum(printed.values()) == pytest.approx(total, abs=0.01 * len(printed))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_accumulation_holds_every_gradient_through_the_next_micro_batch(tiny_model_dir, method):
    """With train.grad_accum > 1 the earlier micro-batches' gradients stay allocated through the
    next one's forward and backward: at the peak the plan counts as many gradient bytes as the real
    model holds after one backward, whatever moment the peak falls on (a full fine-tune's are as large
    as its weights; without accumulation its peak is mid-backward with a part of them)."""
    from helpers import trainable
    from tunesmith.config import AdapterConfig
    from tunesmith.models import load_model

    model = trainable(load_model(str(tiny_model_dir), torch.float32), AdapterConfig(method=method))
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    held = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    shape = model_shape(str(tiny_model_dir))
    one, four = (estimate(shape, Setup(method=method, dtype="float32", batch=2, seq=64, grad_accum=n)) for n in (1, 4))
    assert four.parts["gradients"] == pytest.approx(held, rel=0.01)
    assert four.total - one.total == pytest.approx(held - one.parts["gradients"], rel=0.01)
    assert one.parts["gradients"] < held  # this peak falls before the backward has made them all


@pytest.mark.parametrize("seq", [1, 100, 300, 512, 1024, 4096])
def test_attention_scores_are_the_largest_block_training_attention_makes(seq):
    """plan/memory.py counts, for a padding-free row, the largest score matrix of the query blocks
    accel/cpu/attention.py cuts a sequence into; packed rows hold the whole batch's."""
    from tunesmith.plan.memory import BLOCK_ROWS, attention_scores
    from tunesmith.accel.cpu import attention

    assert BLOCK_ROWS == attention.BLOCK_ROWS
    shape = model_shape("llama-3.1-8b")
    largest = max((end - first) * (end - start) for first, end, start in attention._pieces(((0, seq),), BLOCK_ROWS))
    setup = Setup(method="lora", dtype="bfloat16", batch=4, seq=seq, cpu_attention=True)
    assert attention_scores(shape, setup) == shape.heads * largest
    packed = Setup(**{**setup.__dict__, "packed_rows": True})
    assert attention_scores(shape, packed) == 4 * shape.heads * seq ** 2
    # accel/cpu/native.py's kernel keeps no score matrix and no mask; packed rows still take the matmuls
    kernel = Setup(**{**setup.__dict__, "native_attention": True})
    assert attention_scores(shape, kernel) == 0
    assert estimate(shape, setup).total - estimate(shape, kernel).total >= 4 * seq ** 2
    assert attention_scores(shape, Setup(**{**packed.__dict__, "native_attention": True})) == 4 * shape.heads * seq ** 2


def test_checkpointing_quantisation_and_batch_move_memory_the_right_way():
    shape = model_shape("llama-3.1-8b")
    base = Setup(method="lora", dtype="bfloat16", batch=4, seq=2048)
    lora = estimate(shape, base)
    ckpt = estimate(shape, Setup(**{**base.__dict__, "gradient_checkpointing": True}))
    qlora = estimate(shape, Setup(**{**base.__dict__, "method": "qlora", "upcast_extras": False}))
    assert ckpt.parts["activations"] < lora.parts["activations"] / 5
    assert qlora.parts["weights"] < lora.parts["weights"] / 2.5  # embeddings and head stay 16-bit
    full = estimate(shape, Setup(method="full", dtype="bfloat16", batch=1, seq=512))
    # Full fine-tuning of a bf16 model with AdamW: fp32 master weights and two fp32 states (adapters/lora.py).
    assert full.parts["weights"] + full.parts["optimizer states"] == pytest.approx(12 * shape.total_params)


# Published peak memory, each with the configuration it was measured in.
# torchtune README (Llama 3.1 8B on one RTX 4090): batch 2, packed sequences of 2048 tokens (every position has
# a label), activation checkpointing, torch.compile, bf16 everywhere (LoRA weights and AdamW states included),
# LoRA rank 8 on q_proj, v_proj, output_proj and the MLP (recipes llama3_1/8B_lora_single_device.yaml and
# 8B_qlora_single_device.yaml); embeddings and LM head stay bf16 (no fp32 upcast). Its loss
# (CEWithChunkedOutputLoss, compiled) runs the head in 8 chunks (512 positions here) and keeps the bf16 logits.
# torchtune reports torch.cuda memory statistics, which leave out the CUDA context: compared without overhead.
TORCHTUNE = Setup(method="lora", dtype="bfloat16", batch=2, seq=2048, gradient_checkpointing=True, r=8,
                  targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), label_share=1.0,
                  adapter_dtype="bfloat16", upcast_extras=False, head_chunk=512, kept_logit_bytes=2)


@pytest.mark.parametrize("method,published_gib", [("qlora", 7.4), ("lora", 16.2)])
def test_llama_3_1_8b_matches_torchtune_on_an_rtx_4090(method, published_gib):
    setup = Setup(**{**TORCHTUNE.__dict__, "method": method})
    est = estimate(model_shape("meta-llama/Llama-3.1-8B"), setup)
    assert est.total <= GPUS["rtx4090"].memory
    assert est.total / GiB == pytest.approx(published_gib, rel=0.25)


def test_llama_65b_qlora_fits_one_48_gb_gpu_as_in_the_qlora_paper():
    # QLoRA paper (Dettmers et al. 2023): LLaMA-65B fine-tuned on one 48 GB GPU with NF4 + double quantisation,
    # LoRA r=64 on every linear layer, bf16 adapters and embeddings, paged 32-bit AdamW (8 bytes per weight),
    # gradient checkpointing, micro-batch 1, sequences up to 512 tokens.
    setup = Setup(method="qlora", dtype="bfloat16", batch=1, seq=512, gradient_checkpointing=True, r=64,
                  adapter_dtype="bfloat16", optimizer_bytes=8, upcast_extras=False)
    card = GPUS["a100-40gb"].__class__("48 GB", 48 * GB, 150, 38)
    est = estimate_on(model_shape("llama-65b"), setup, card)
    assert 0.75 * 48 * GB <= est.total <= 48 * GB
    # ... and the same model in 16-bit LoRA does not fit.
    assert estimate_on(model_shape("llama-65b"), Setup(**{**setup.__dict__, "method": "lora"}), card).total > 48 * GB


def test_a_plan_that_does_not_fit_names_changes_that_do():
    p = plan("llama-3.1-8b", Setup(method="lora", dtype="bfloat16", batch=8, seq=2048), device="t4",
             include_this_machine=False)
    assert not p.target.fits
    assert p.changes and all(changed.total <= 16 * GiB for _, changed in p.changes)
    assert "does not fit T4" in format_plan(p)
    # --no-this-machine holds with a device named too: no row of (and no matmul benchmark on) this machine
    assert [fit.device.name for fit in p.fits if fit.device.is_cpu] == []
    # A T4 has no fast bf16 (the plan trains it in float32 there): bf16 is not among its changes; an A10's has it.
    t4 = plan("llama-3.1-8b", Setup(method="qlora", batch=4, seq=2048, dtype_auto=True), device="t4",
              include_this_machine=False)
    assert t4.setup.dtype == "float32" and t4.changes
    assert not any("bfloat16" in label for label, _ in t4.changes), t4.changes
    from tunesmith.plan import candidate_changes

    fp32 = Setup(method="lora", dtype="float32", batch=8, seq=2048)
    assert any("model.dtype=bfloat16" in label for label, _ in candidate_changes(fp32))
    assert not any("model.dtype=bfloat16" in label for label, _ in candidate_changes(fp32, bf16=False))


def test_a_gpu_just_too_small_is_offered_offloaded_activations_and_bf16_adapters(monkeypatch):
    """8B QLoRA at 2 x 2048 needs about 9.1 GiB with its CUDA overhead: on 9.7 GiB (8.7 within the
    headroom a run keeps) it is tight, and the first change offered keeps every result and moves the activations to the host; bf16 adapters follow. A CPU
    gains nothing from offloading, so its plan never offers it."""
    setup = Setup(method="qlora", dtype="bfloat16", batch=2, seq=2048, r=32, gradient_checkpointing=True)
    tight = plan("llama-3.1-8b", setup, memory_gib=9.7, include_this_machine=False)
    assert tight.target.tight and not tight.target.fits and "tight on 9.7 GiB; changes that fit:" in format_plan(tight)
    changes = [label for label, _ in tight.changes]
    assert "offload_activations=true" in changes[0]
    assert any("adapter.dtype=bfloat16" in label for label in changes)
    small_cpu = Device("a CPU", 9.7 * GiB, None, 1.0, is_cpu=True)
    monkeypatch.setattr("tunesmith.plan.find_device", lambda name: small_cpu)
    on_cpu = plan("llama-3.1-8b", Setup(method="qlora", dtype="bfloat16", batch=2, seq=2048, r=32),
                  device="this-machine", include_this_machine=False)
    assert on_cpu.changes and not any("offload" in label for label, _ in on_cpu.changes)


def test_flops_per_token_follow_6n_and_4n():
    shape = shape_from_dict(dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                 num_hidden_layers=32, num_attention_heads=32))
    n = shape.layers * shape.block_linear_params
    setup = Setup(method="full", seq=1, label_share=0.0)
    assert flops_per_token(shape, setup) == pytest.approx(6 * n, rel=0.01)
    lora = flops_per_token(shape, Setup(method="lora", seq=1, label_share=0.0, r=8))
    assert lora == pytest.approx(4 * n, rel=0.02)
    assert flops_per_token(shape, Setup(method="full", seq=4096)) > flops_per_token(shape, Setup(method="full", seq=256))


def test_time_per_epoch_from_published_numbers():
    """QLoRA on Llama 3.1 8B, 1M tokens on an H100: the time from the model's published shape
    (config.json: hidden 4096, intermediate 14336, 32 layers, 8 KV heads of 128) and the H100's
    published dense bf16 peak (989 TFLOP/s) at 40% utilisation. LoRA's training FLOPs are about
    4 per weight of the blocks' matrices (forward 2, input gradients 2), plus the LM head,
    attention and adapters: at least that, at most a quarter more."""
    hidden, intermediate, layers, kv = 4096, 14336, 32, 8 * 128
    block_weights = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate)
    least = 1_000_000 * 4 * block_weights / (989e12 * 0.4)
    found = plan("llama-3.1-8b", Setup(method="qlora"), tokens=1_000_000, include_this_machine=False)
    h100 = next(f for f in found.fits if f.device.name.startswith("H100"))
    assert least <= h100.epoch_seconds <= 1.25 * least, (h100.epoch_seconds, least)


def test_cli_plan_reads_only_the_config(tiny_model_dir, capsys):
    from tunesmith.cli import main

    (tiny_model_dir / "model.safetensors").rename(tiny_model_dir / "weights.hidden")
    try:
        code = main(["plan", "--model", str(tiny_model_dir), "--method", "qlora", "--seq", "128", "--batch", "2",
                     "--memory", "1", "--no-this-machine"])
    finally:
        (tiny_model_dir / "weights.hidden").rename(tiny_model_dir / "model.safetensors")
    out = capsys.readouterr().out
    assert code == 0
    assert "optimizer states" in out and "RTX 4090" in out


def test_cli_plan_bad_input_is_one_line(tmp_path, capsys):
    from tunesmith.cli import main

    assert main(["plan", "--model", str(tmp_path / "nowhere"), "--no-this-machine"]) == 2
    assert main(["plan", "--model", "llama-3.1-8b", "--device", "abacus", "--no-this-machine"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unknown device 'abacus'" in err[1]


def test_mfu_counts_the_model_flops_not_checkpointings_second_forward(monkeypatch):
    """MFU divides the model's FLOPs by the peak: the same tokens/s is the same MFU with or without
    gradient checkpointing, although the checkpointed step computes more (its epoch takes longer).
    On an H200 (989 TFLOP/s dense bf16), 8B LoRA at 10,000 tokens/s of 2048-token rows is about
    4 FLOPs per weight: 32% MFU."""
    monkeypatch.setattr("tunesmith.plan.run.gpu_of", lambda device: GPUS["h200"])
    split = SimpleNamespace(encoded=[SimpleNamespace(input_ids=[0] * 2048, label_count=2048)] * 4)
    mfu = {}
    for ckpt in (True, False):
        cfg = validate({"model": {"name": "llama-3.1-8b", "dtype": "bfloat16"},
                        "data": {"max_seq_len": 2048}, "adapter": {"method": "lora", "gradient_checkpointing": ckpt}})
        mfu[ckpt] = utilisation_of(cfg, split, torch.device("cuda", 0))(10_000)
        setup = setup_from_config(cfg, 1.0)
        if ckpt:  # the time estimate does count the second forward
            assert flops_per_token(model_shape("llama-3.1-8b"), setup) > 1.3 * flops_per_token(
                model_shape("llama-3.1-8b"), setup, recompute=False)
    assert mfu[True] == pytest.approx(mfu[False])
    assert mfu[False] == pytest.approx(0.32, abs=0.02)


def test_this_machine_is_its_first_gpu_where_cuda_is_available(monkeypatch):
    """`train.device: auto` trains on cuda:0 there, so the plan's "this machine" is that GPU: its
    real memory, the data-sheet peak of its model; a GPU the plan does not know gets no time."""
    from tunesmith.plan.devices import this_machine

    props = {"NVIDIA H200": 150_000_000_000, "NVIDIA Quadro X": 16 * 2**30}
    name = iter(props)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for _ in range(2):
        current = next(name)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, n=current: SimpleNamespace(name=n, total_memory=props[n]))
        here = this_machine()
        assert here.name == f"this machine: {current}" and here.memory == props[current] and not here.is_cpu
        assert here.bf16_tflops == (989 if current == "NVIDIA H200" else None)
    found = plan("llama-3.1-8b", Setup(method="qlora", dtype="bfloat16", batch=1, seq=1024), device="this",
                 tokens=10**6)
    assert found.target.device.name == "this machine: NVIDIA Quadro X" and found.target.epoch_seconds is None
    assert found.target.fits and not found.fits[-1].device.is_cpu  # 8B QLoRA at 1 x 1024: about 11 GiB


def test_the_run_estimate_counts_accumulation_where_steps_have_several_micro_batches(monkeypatch):
    """`tunesmith train`'s estimate: held gradients only where a step is cut into several
    micro-batches (padding-free, a step of short examples is one forward whatever grad_accum says);
    on a GPU the figure set against allocated memory is the tensors', the CUDA context and the
    allocator's slack said beside it."""
    from tunesmith.data.collate import PADDING_FREE
    from tunesmith.plan import run_estimate

    from tunesmith.data.prepare import Split

    def split(length):
        return Split("train", [], [SimpleNamespace(input_ids=[0] * length, label_count=length)] * 16)

    def predicted(length, accum, device=torch.device("cpu")):
        cfg = validate({"model": {"name": "llama-3.2-1b", "dtype": "bfloat16"}, "data": {"max_seq_len": 1024},
                        "adapter": {"method": "full"}, "train": {"batch_size": 2, "grad_accum": accum}})
        return run_estimate(cfg, split(length), PADDING_FREE, device)

    import tunesmith.plan.run as planning

    seen = []
    real = planning.estimate_for_machine
    monkeypatch.setattr(planning, "estimate_for_machine", lambda shape, setup: seen.append(setup) or real(shape, setup))
    predicted(100, 4)  # 8 examples of 100 tokens a step: one micro-batch
    predicted(1024, 4)  # 8 of 1024: four micro-batches of 2 x 1024
    assert [setup.grad_accum for setup in seen] == [1, 4]
    gradients = 4 * model_shape("llama-3.2-1b").total_params  # a full fine-tune's, in fp32
    assert 0.5 * gradients < predicted(1024, 4)[0] - predicted(1024, 1)[0] <= gradients
    monkeypatch.setattr("tunesmith.plan.run.gpu_of", lambda device: GPUS["h200"])
    allocated, line = predicted(1024, 4, torch.device("cuda", 0))
    with_overhead = estimate_on(model_shape("llama-3.2-1b"), Setup(method="full", dtype="bfloat16", batch=2,
                                                                   seq=1024, grad_accum=4), GPUS["h200"])
    assert allocated < with_overhead.total and "with the CUDA context and allocator slack" in line


def test_auto_checkpointing_takes_the_fewest_first_blocks_that_fit_each_device():
    """8B LoRA bf16 at 2 x 2048 (33 GiB of tensors with no checkpointing, 17 with every block):
    'auto' (the default) checkpoints some of the 32 blocks on a 24 GB card, one fewer would not
    fit, none on an 80 GB one; the time counts the recomputed blocks only. With checkpointing set
    to on or off, a card it does not fit is offered the same fewest blocks first."""
    from dataclasses import replace

    from tunesmith.plan.setup import checkpointed_layers

    cfg = validate({"model": {"name": "llama-3.1-8b", "dtype": "bfloat16"}, "data": {"max_seq_len": 2048},
                    "train": {"batch_size": 2}})
    setup = setup_from_config(cfg)
    assert setup.checkpointing_auto and not setup.gradient_checkpointing
    found = plan("llama-3.1-8b", setup, device="rtx4090", include_this_machine=False, tokens=10**6)
    card, large = found.target, next(f for f in found.fits if f.device.name == "H100 80 GB")
    blocks = checkpointed_layers(found.shape, card.estimate.setup)
    assert card.fits and 0 < blocks < 32 and checkpointed_layers(found.shape, large.estimate.setup) == 0
    assert estimate_on(found.shape, replace(card.estimate.setup, checkpoint_layers=blocks - 1),
                       card.device).total > HEADROOM * card.device.memory
    assert f"checkpointing {blocks} of 32 blocks" in format_plan(found)
    shape, none, every = found.shape, replace(setup, checkpointing_auto=False), card.estimate.setup
    recomputed = flops_per_token(shape, every) - flops_per_token(shape, none)
    assert recomputed == pytest.approx(blocks / 32 * (flops_per_token(shape, replace(
        none, gradient_checkpointing=True)) - flops_per_token(shape, none)))
    fixed = plan("llama-3.1-8b", none, device="rtx4090", include_this_machine=False)
    assert not fixed.target.fits and f"first {blocks} of 32 blocks" in fixed.changes[0][0]


@pytest.mark.parametrize("reported, expected", [
    ("NVIDIA A100-SXM4-80GB", "A100 40 GB"),  # A100s of either size have the same peaks
    ("NVIDIA A10", "A10 24 GB"),
    ("NVIDIA A10G", "A10 24 GB"),  # AWS's, taken as the A10 as before
    ("NVIDIA RTX A6000", None),  # not an RTX 4090 (the first-word match took it for one)
    ("NVIDIA L4", "L4 24 GB"),
    ("NVIDIA L40S", None),  # not an L4
    ("NVIDIA GeForce RTX 4090", "RTX 4090 24 GB"),
    ("NVIDIA GeForce RTX 3090", None),  # not a 4090
    ("NVIDIA H200", "H200 141 GB"),
    ("Tesla T4", "T4 16 GB"),
])
def test_a_gpu_gets_the_peaks_of_its_own_model(monkeypatch, reported, expected):
    """Matched by the first word, an A100 took the A10's bf16 peak (125 of 312 TFLOP/s) and an L40S the L4's."""
    from types import SimpleNamespace

    from tunesmith.plan.devices import GPUS, gpu_of

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(
        name=reported, total_memory=80 * GiB))
    found = gpu_of("cuda:0")
    peaks = {d.name: d.bf16_tflops for d in GPUS.values()}
    assert found.name == reported and found.memory == 80 * GiB
    assert found.bf16_tflops == (peaks[expected] if expected else None)


def test_device_cpu_plans_this_machines_processor_also_beside_a_gpu(monkeypatch):
    from types import SimpleNamespace

    from tunesmith.plan.devices import find_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(
        name="NVIDIA H200", total_memory=141 * GiB))
    assert find_device("this-machine").name == "this machine: NVIDIA H200"
    assert find_device("cpu").is_cpu


def test_auto_dtype_plans_each_device_in_the_dtype_a_run_there_trains_in(monkeypatch):
    """model.dtype: auto (the default) without a device: an A100 row is planned in bf16 (what a run
    there trains in), a T4 row and this CPU (no fast bf16 here) in fp32; `--dtype` fixes one for all.
    Before, every row took this machine's fp32, and 8B LoRA 'did not fit' a 24 GB GPU."""
    import tunesmith.device as device_module
    from tunesmith.plan import plan_for

    monkeypatch.setattr(device_module, "bf16_is_fast", lambda device: False)  # this CPU: fp32, as here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine's row is its CPU, also on a GPU host
    found = plan_for(model="llama-3.1-8b", seq=512, batch=8)
    rows = {fit.device.name: fit for fit in found.fits}
    assert rows["A100 80 GB"].estimate.setup.dtype == "bfloat16" and rows["T4 16 GB"].estimate.setup.dtype == "float32"
    assert rows["this machine"].estimate.setup.dtype == "float32" and rows["L4 24 GB"].fits
    bf16 = plan("llama-3.1-8b", Setup(method="lora", dtype="bfloat16", batch=8, seq=512, checkpointing_auto=True))
    assert rows["A100 80 GB"].estimate.total == next(f for f in bf16.fits if f.device.name == "A100 80 GB").estimate.total
    assert found.estimate.setup.dtype == "bfloat16" and "model.dtype auto" in format_plan(found)
    fixed = plan_for(model="llama-3.1-8b", seq=512, batch=8, dtype="float32")
    assert {f.estimate.setup.dtype for f in fixed.fits} == {"float32"} and "model.dtype auto" not in format_plan(fixed)
    on_t4 = plan_for(model="llama-3.1-8b", seq=512, batch=8, device="t4")
    # with the default adapter.gradient_checkpointing: auto, a device it does not fit still gets changes that fit
    assert on_t4.estimate.setup.dtype == "float32" and any("adapter.method=qlora" in c for c, _ in on_t4.changes)


def test_the_matmul_peak_is_measured_again_when_the_machine_is_quieter(monkeypatch, tmp_path):
    """A peak measured while other work ran is too low (every MFU then reads high): the cache keeps
    the fastest measurement and takes another whenever the load per CPU has fallen by QUIETER."""
    from tunesmith.plan import speed

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    measured, load = iter([1.0, 3.0, 2.0, 5.0]), {"now": 1.0}
    calls = []

    def measure(dtype):
        calls.append(load["now"])
        return next(measured)

    monkeypatch.setattr(speed, "_measure_matmul", measure)
    monkeypatch.setattr(speed, "load_per_cpu", lambda: load["now"])
    assert speed.matmul_peak("float32") == 1.0 and calls == [1.0]
    load["now"] = 0.8  # not quieter by QUIETER: the cached figure stands
    assert speed.matmul_peak("float32") == 1.0 and calls == [1.0]
    load["now"] = 0.5
    assert speed.matmul_peak("float32") == 3.0 and calls == [1.0, 0.5]
    load["now"] = 0.2  # slower this time: the fastest seen is kept
    assert speed.matmul_peak("float32") == 3.0 and calls == [1.0, 0.5, 0.2]
    load["now"] = 0.9
    assert speed.matmul_peak("float32") == 3.0 and len(calls) == 3
    path = tmp_path / "plan" / "matmul_peak.json"
    saved = json.loads(path.read_text())
    [key] = saved
    saved[key] = 4.0  # a bare figure, as caches written before the load was kept hold
    path.write_text(json.dumps(saved))
    assert speed.matmul_peak("float32") == 5.0 and len(calls) == 4  # measured again whatever the load
