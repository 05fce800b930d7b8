"""Gradient checkpointing of the first k decoder blocks (training/recompute.py), and
`adapter.gradient_checkpointing: auto` choosing k from the run's plan."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import build_model, build_tokenizer, gradients, trainable
from tunesmith.config import AdapterConfig, validate
from tunesmith.data.collate import PADDING_FREE
from tunesmith.data.prepare import Split
from tunesmith.plan import estimated, fewest_within, run_setup
from tunesmith.plan.devices import ALLOCATOR_SLACK, GPUS
from tunesmith.training import recompute
from tunesmith.training.distributed import SINGLE

LAYERS = 4


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-4")
    build_model(folder, "llama", vocab=len(build_tokenizer(folder)), layers=LAYERS)
    return folder


def _step(folder, blocks: int):
    """One forward and backward of LoRA (dropout on) with the first `blocks` blocks checkpointed:
    (attention calls per block, gradients)."""
    from tunesmith.models import load_model
    from tunesmith.training.loss import label_loss_sum

    torch.manual_seed(0)
    model = trainable(load_model(str(folder), torch.float32),
                      AdapterConfig(r=4, dropout=0.1, gradient_checkpointing=False))
    with torch.no_grad():  # B non-zero, so A has gradients too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    recompute.checkpoint_first(model, blocks)
    calls = [0] * LAYERS
    for n, block in enumerate(recompute.decoder_blocks(model)):
        block.self_attn.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
    ids = torch.randint(3, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100
    model.train()
    torch.manual_seed(2)  # the dropout masks
    total, count = label_loss_sum(model, {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    (total / count).backward()
    return calls, gradients(model)


def test_the_first_k_blocks_run_their_forward_again_and_the_gradients_stay_the_same(four_blocks):
    """Checkpointed blocks run their forward twice (once more in the backward pass), the others
    once; dropout masks are replayed, so the gradients are those of no checkpointing."""
    calls, expected = _step(four_blocks, 0)
    assert calls == [1] * LAYERS
    for blocks in (1, 3, LAYERS):
        calls, grads = _step(four_blocks, blocks)
        assert calls == [2] * blocks + [1] * (LAYERS - blocks)
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():  # fp32, the fast paths' bar: a compiled and an eager norm may differ in the last bit
            relative = float((grads[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-12))
            assert relative < 1e-5, (name, blocks, relative)


def _split(length: int, n: int = 16) -> Split:
    return Split("train", [], [SimpleNamespace(input_ids=[0] * length, label_count=length)] * n)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_takes_the_fewest_first_blocks_whose_planned_peak_fits(monkeypatch, device):
    """On a 1B model at 4 x 1024 tokens the planned peak falls block by block; 'auto' takes the
    fewest blocks within the memory it is given, none where everything fits, and all where even
    that is too much (on a GPU the tensors are planned, set against allocated memory)."""
    monkeypatch.setattr("tunesmith.plan.run.gpu_of", lambda _: GPUS["h200"])
    cfg = validate({"model": {"name": "llama-3.2-1b", "dtype": "bfloat16"}, "data": {"max_seq_len": 1024},
                    "train": {"batch_size": 4}})
    where, split = torch.device(device, 0) if device == "cuda" else torch.device("cpu"), _split(1024)
    layers = 16
    # what 'auto' sets against the memory: on a GPU the tensors with the caching allocator's slack
    slack = 1 + ALLOCATOR_SLACK if device == "cuda" else 1.0
    run = run_setup(cfg, split, PADDING_FREE, where)
    assert run.shape.layers == layers
    peaks = [slack * estimated(run, k)[0] for k in range(layers + 1)]
    # each block checkpointed keeps its input, not its activations (a few hundred MiB here)
    assert all(a - b > 100 * 2**20 for a, b in zip(peaks[:-1], peaks[1:-1]))
    budget = (peaks[0] + peaks[-1]) / 2
    fewest = fewest_within(run, budget)
    assert 0 < fewest < layers
    assert peaks[fewest] <= budget < peaks[fewest - 1]
    assert fewest_within(run, peaks[0]) == 0
    assert fewest_within(run, min(peaks) - 1) is None


def test_the_run_checkpoints_what_auto_chose_and_says_so(monkeypatch, four_blocks):
    """`recompute.choose` on a real model: the blocks 'auto' picked for the memory the device has
    are the ones whose flag is set; too little memory checkpoints every block and says so; an
    integer checkpoints that many."""
    split = _split(200)
    settings = {"model": {"name": str(four_blocks), "dtype": "float32"}, "data": {"max_seq_len": 256},
                "train": {"batch_size": 4}}
    cpu = torch.device("cpu")
    run = run_setup(validate(settings), split, PADDING_FREE, cpu)
    peaks = [estimated(run, k)[0] for k in range(LAYERS + 1)]

    def chosen(setting, free, planned=True):
        from tunesmith.models import load_model

        monkeypatch.setattr(recompute, "memory_for_run", lambda device, baseline: free)
        cfg = validate({**settings, "adapter": {"gradient_checkpointing": setting}})
        model = trainable(load_model(str(four_blocks), torch.float32), cfg.adapter)
        picked = recompute.choose(cfg, model, run_setup(cfg, split, PADDING_FREE, cpu) if planned else None,
                                  cpu, 0.0, SINGLE)
        assert [b.gradient_checkpointing for b in recompute.decoder_blocks(model)] == \
            [True] * picked.blocks + [False] * (LAYERS - picked.blocks)
        return picked

    roomy = chosen("auto", peaks[0] / recompute.HEADROOM * 1.01)
    assert roomy.blocks == 0 and "auto: 0 of 4 blocks" in roomy.line
    middle = chosen("auto", peaks[2] / recompute.HEADROOM * 1.0001)
    assert middle.blocks == 2 and middle.record() == {"blocks": 2, "of": 4, "setting": "auto"}
    tight = chosen("auto", 1.0)
    assert tight.blocks == LAYERS and "even so the planned peak is above" in tight.line
    assert chosen(3, 1.0).blocks == 3 and chosen(True, 1.0).blocks == LAYERS and chosen(False, 1.0).blocks == 0
    assert chosen(9, 1.0).blocks == LAYERS  # more than the model has: all of them
    unplanned = chosen("auto", 10 * peaks[0], planned=False)  # a run that could not be planned: every block
    assert unplanned.blocks == LAYERS and "no plan of the run" in unplanned.line
