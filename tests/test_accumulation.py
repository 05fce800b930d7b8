"""Token-normalised gradient accumulation, checked on the raw gradients of the loop's own code.

One optimizer step over 8 examples of mixed lengths: the .grad left by training/step.py
`train_step` (behind the distributed wrapper, as `fit` runs it) equals the definition (the loss
summed over every label token of the step, divided once by their count), whether the step is 1,
2 or 4 micro-batches, cut by grad_accum or by the out-of-memory halving, and on 1 or 2 ranks.
Gradients are compared before any optimizer step: AdamW with clipping would hide a constant
factor (a wrong world-size scale), plain gradients do not.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import assert_same_gradients, full_logits_loss, gradients, write_jsonl
from tunesmith.data.collate import collate
from tunesmith.data.tokenize import IGNORE, Encoded

HERE = Path(__file__).parent
ALL = [list(range(8))]


@pytest.fixture(scope="module")
def step_data(tmp_path_factory):
    rng = random.Random(5)
    rows = []
    for _ in range(8):  # lengths 6..70, answers of 1..30 tokens: short examples weigh less per example
        length = rng.randint(6, 70)
        prompt = rng.randint(1, min(length - 1, 40))
        rows.append({"ids": [rng.randint(3, 500) for _ in range(length)], "prompt": prompt})
    rows[3]["prompt"] = 0  # raw text: its first token is labelled, with nothing before it to predict it from
    return write_jsonl(tmp_path_factory.mktemp("accumulation") / "step.jsonl", rows)


def loop_grads(model_dir, data, tmp_path, indices, pieces: int = 1) -> tuple[dict, float]:
    """dist_grads.py in this process (one rank): (gradients, the step's loss)."""
    import dist_grads

    out = tmp_path / f"grads-{len(indices)}-{pieces}.safetensors"
    dist_grads.main(str(model_dir), str(data), str(out), json.dumps(indices), str(pieces))
    return saved(out)


def saved(out: Path) -> tuple[dict, float]:
    with safe_open(out, "pt") as handle:
        loss = float(handle.metadata()["loss"])
    return load_file(out), loss


def definition_grads(model_dir, data) -> tuple[dict, float]:
    """sum over the step's label tokens of the cross-entropy / their count, in one padded batch:
    (gradients, that loss)."""
    from tunesmith import methods
    from tunesmith.config import AdapterConfig
    from tunesmith.models import load_model

    torch.manual_seed(0)
    model = methods.get("lora").make_trainable(load_model(str(model_dir)), AdapterConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    rows = [json.loads(line) for line in open(data)]
    examples = [Encoded(r["ids"], [IGNORE] * r["prompt"] + r["ids"][r["prompt"]:]) for r in rows]
    batch = collate(examples, 0)
    count = int((batch["labels"][:, 1:] != IGNORE).sum())
    loss = full_logits_loss(model, batch) / count
    loss.backward()
    return gradients(model), float(loss)


@pytest.mark.parametrize("indices,pieces", [
    (ALL, 1), (ALL, 2), (ALL, 4),  # one micro-batch, halved once or twice after an out-of-memory error
    ([[0, 1, 2, 3], [4, 5, 6, 7]], 1),  # grad_accum 2
    ([[7, 0], [6, 1], [5, 2], [4, 3]], 1),  # grad_accum 4, long and short examples together
])
def test_one_process_accumulates_to_the_definition(tiny_model_dir, step_data, tmp_path, indices, pieces):
    expected, expected_loss = definition_grads(tiny_model_dir, step_data)
    grads, loss = loop_grads(tiny_model_dir, step_data, tmp_path, indices, pieces)
    assert_same_gradients(expected, grads, 1e-5)
    assert loss == pytest.approx(expected_loss, rel=1e-5)


def test_two_ranks_accumulate_to_the_definition(tiny_model_dir, step_data, tmp_path):
    """Each rank takes every other example of each micro-batch; DDP averages the ranks'
    gradients, which the loop turns into the sum: the same raw gradients as one process."""
    expected, expected_loss = definition_grads(tiny_model_dir, step_data)
    out = tmp_path / "two-ranks.safetensors"
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "dist_grads.py"), str(tiny_model_dir), str(step_data), str(out),
                           json.dumps([[0, 1, 2, 3], [4, 5, 6, 7]])],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr[-3000:]
    grads, loss = saved(out)
    assert_same_gradients(expected, grads, 1e-5)
    assert loss == pytest.approx(expected_loss, rel=1e-5)  # the logged loss: both ranks' shares summed
    with safe_open(out, "pt") as handle:  # the ranks agree on the largest of their values (10 and 11)
        assert handle.metadata()["most"] == "11.0"


def test_the_process_group_waits_hours_for_rank_0s_work_alone(monkeypatch):
    """Rank 0 alone scores the base before training and the result after it, while the others wait in a
    collective: under gloo's 30-minute default a large test set had the finished job killed."""
    import torch.distributed as dist

    from tunesmith.training import distributed

    asked = {}

    def record(backend, **options):
        asked.update(options, backend=backend)
        raise RuntimeError("recorded")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", record)
    with pytest.raises(RuntimeError, match="recorded"):
        distributed.setup("cpu")
    assert asked["backend"] == "gloo" and asked["timeout"].total_seconds() >= 3600


@pytest.mark.parametrize("layout", ["padded", "padding-free"])
def test_eval_loss_is_the_mean_over_every_label_token_of_the_split(tiny_model_dir, step_data, layout):
    """Batches of 2 examples whose answers run from 1 to 60 tokens: the eval loss is the split's summed
    loss over its label-token count, not a mean of the batches' means (which would weigh a one-token
    answer's batch as much as a long one's)."""
    from helpers import seeded_lora
    from tunesmith.data.prepare import Split
    from tunesmith.eval.loss import eval_loss

    model = seeded_lora(tiny_model_dir, torch.float32, torch.device("cpu"), fast=layout == "padding-free")
    rows = [json.loads(line) for line in open(step_data)]
    examples = [Encoded(r["ids"], [IGNORE] * r["prompt"] + r["ids"][r["prompt"]:]) for r in rows]
    batch = collate(examples, 0)
    with torch.no_grad():
        expected = float(full_logits_loss(model, batch)) / int((batch["labels"][:, 1:] != IGNORE).sum())
    assert eval_loss(model, Split("validation", [], examples), 2, 0, layout=layout) == pytest.approx(expected, rel=1e-5)
