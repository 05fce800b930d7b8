"""Runs survive kills, signals and bad numbers, and lose nothing."""
import json
import math
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers import STEPS, finished, records, run_cli, start_and_kill_at, write_config


# The kill-and-resume runs are compared with the reference to 1e-6: all on the CPU, whose kernels are
# deterministic (on CUDA, attention and reduction kernels may differ between two runs in the last bits).
@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    run = finished(write_config(tmp_path_factory.mktemp("reference"), tiny_model_dir, "run", device="cpu"))
    return {"weights": load_file(run / "adapter" / "adapter_model.safetensors"),
            "losses": [(r["step"], r["loss"]) for r in records(run, "train")],
            "samples": [(r["step"], r["ids"]) for r in records(run, "samples")]}


# Seed 2 runs with `make test`; the other seeds in the slow set (the 10-minute budget of `make test`).
# seed 3 (a third kill point) is `long`: make test-slow runs it, .ci/run's slow set does not (its 90 minutes).
@pytest.mark.parametrize("seed", [pytest.param(1, marks=pytest.mark.slow), 2,
                                  pytest.param(3, marks=pytest.mark.long)])
def test_sigkill_then_resume_equals_uninterrupted_run(seed, reference, tiny_model_dir, tmp_path):
    kill_step = random.Random(seed).randint(2, STEPS - 2)
    config = write_config(tmp_path, tiny_model_dir, "run", device="cpu")  # as the reference
    run = tmp_path / "run"
    if seed == 3:
        # Die during a checkpoint write: a partial folder is left behind and must be ignored.
        from tunesmith.training.checkpoint import complete_checkpoints, partial_checkpoints

        start_and_kill_at(config, run, kill_step)
        if not partial_checkpoints(run / "checkpoints"):  # the kill may land mid-write by itself
            newest = complete_checkpoints(run / "checkpoints")[-1]
            partial = newest.with_name(f"step-{int(newest.name[5:]) + 1:08d}.partial")
            partial.mkdir()
            (partial / "trainable.safetensors").write_bytes(b"half a file")
    else:
        assert start_and_kill_at(config, run, kill_step) == -signal.SIGKILL
    done = run_cli(config)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "resuming from" in line]  # one line: step and checkpoint
    assert len(said) == 1 and f"({run / 'checkpoints'}/step-" in said[0], said
    if seed == 3:
        assert "ignoring partial checkpoint" in done.stderr
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert weights.keys() == reference["weights"].keys()
    for name, value in weights.items():
        assert (value - reference["weights"][name]).abs().max() < 1e-6, name
    # Lists, not dicts keyed by step: a step recorded twice (before the kill and again after the
    # resume) must show.
    losses = [(r["step"], r["loss"]) for r in records(run, "train")]
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    assert [step for step, _ in reference["losses"]] == list(range(1, STEPS + 1))
    assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in reference["losses"]], abs=1e-6)
    samples = [(r["step"], r["ids"]) for r in records(run, "samples")]
    assert samples == reference["samples"]  # no gap, no repeat, same order


def test_sigterm_writes_a_checkpoint_and_exits_143(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, "run", checkpoint_every=0)
    run = tmp_path / "run"
    assert start_and_kill_at(config, run, 3, signal.SIGTERM) == 143
    found = sorted((run / "checkpoints").glob("step-*"))
    assert found and not found[-1].name.endswith(".partial")
    state = json.loads((found[-1] / "state.json").read_text())
    assert state["step"] >= 3
    assert (found[-1] / "trainable.safetensors").exists() and (found[-1] / "optim.pt").exists()


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
def test_changed_config_is_refused_on_resume(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=3)
    run = tmp_path / "run"
    start_and_kill_at(config, run, 2)
    done = run_cli(config, "train.lr=0.5", "adapter.r=8", "--resume")
    assert done.returncode == 2
    assert "adapter.r (4 -> 8)" in done.stderr and "train.lr" in done.stderr
    assert "Traceback" not in done.stderr
    # --resume where no checkpoint reads back: refused (it started over from step 0 and exited 0).
    saved = sorted((run / "checkpoints").glob("step-*"))
    complete = [c for c in saved if not c.name.endswith(".partial")]  # the kill may land while one is written
    assert complete
    for checkpoint in complete:
        blob = checkpoint / "trainable.safetensors"
        blob.write_bytes(blob.read_bytes()[:100])
    done = run_cli(config, "--resume")
    assert done.returncode == 2 and "--resume given, but no checkpoint reads back" in done.stderr, done.stderr
    assert sorted((run / "checkpoints").glob("step-*")) == saved  # nothing moved or written


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
def test_truncated_checkpoint_is_skipped_with_a_message(tiny_model_dir, tmp_path):
    from tunesmith.training.checkpoint import newest_usable

    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=3)
    done = run_cli(config)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "run" / "checkpoints"
    newest = sorted(folder.glob("step-*"))[-1]
    blob = newest / "trainable.safetensors"
    blob.write_bytes(blob.read_bytes()[:100])
    messages = []
    chosen = newest_usable(folder, messages.append)
    assert chosen is not None and chosen != newest
    assert any(newest.name in m and "damaged" in m for m in messages)


def test_full_disk_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import errno

    from helpers import trainable
    from tunesmith.config import AdapterConfig
    from tunesmith.errors import UserError
    from tunesmith.models import load_model
    from tunesmith.training import checkpoint as ckpt

    model = trainable(load_model(str(tiny_model_dir)), AdapterConfig(r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    folder = tmp_path / "checkpoints"
    first = ckpt.save_checkpoint(folder, model, optimizer, scheduler, ckpt.TrainState(step=1), keep=2)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(UserError, match="disk is full.*step-00000001 is intact"):
        ckpt.save_checkpoint(folder, model, optimizer, scheduler, ckpt.TrainState(step=2), keep=2)
    assert ckpt.complete_checkpoints(folder) == [first]
    assert not ckpt.partial_checkpoints(folder)
    assert ckpt.newest_usable(folder, print) == first


def test_each_rank_resumes_its_own_random_state_and_a_rank_the_checkpoint_did_not_know_rank_0s(
        tiny_model_dir, tmp_path):
    """A checkpoint of 2 ranks resumed on 2 takes each rank's own state; resumed on 4 (the number of ranks
    is no setting), ranks 2 and 3 failed on an index the file did not have."""
    from helpers import trainable
    from tunesmith import device as devices
    from tunesmith.config import AdapterConfig
    from tunesmith.models import load_model
    from tunesmith.training import checkpoint as ckpt

    model = trainable(load_model(str(tiny_model_dir)), AdapterConfig(r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    torch.manual_seed(0)
    saved = ckpt.save_checkpoint(tmp_path / "checkpoints", model, optimizer, scheduler, ckpt.TrainState(step=1), keep=2)
    states = []
    for seed in (10, 11):  # what two ranks would have written
        torch.manual_seed(seed)
        states.append({"rng": ckpt.rng_state(), **devices.rng_states(torch.device("cpu"))})
    torch.save(states, saved / ckpt.RANK_RNG)
    for rank, expected in ((1, states[1]), (3, None), (0, None)):
        ckpt.load_checkpoint(saved, model, optimizer, scheduler, rank)
        now = torch.get_rng_state()
        if expected is not None:
            assert torch.equal(now, expected["torch_rng"])
        else:  # rank 0's state, as saved in optim.pt
            torch.manual_seed(0)
            assert torch.equal(now, torch.get_rng_state())


def test_injected_nan_changes_no_weight(tiny_model_dir, tmp_path, monkeypatch):
    import tunesmith
    from tunesmith.training import loop

    real = loop.label_loss_sum
    calls = {"n": 0}
    snapshots = {}

    def poisoned(model, batch):
        loss, count = real(model, batch)
        if not model.training:  # evaluation passes are not training steps
            return loss, count
        calls["n"] += 1
        if calls["n"] in (5, 6):  # both micro-batches of optimizer step 3
            snapshots.setdefault("before", {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
            return loss * float("nan"), count
        if calls["n"] == 7:
            snapshots["after"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss, count

    monkeypatch.setattr(loop, "label_loss_sum", poisoned)
    config = json.loads(write_config(tmp_path, tiny_model_dir, "run", max_steps=4, checkpoint_every=0).read_text())
    results = tunesmith.train(config)
    assert results["skipped_steps"] == [3]
    for name, value in snapshots["before"].items():
        assert torch.equal(value, snapshots["after"][name]), name


def test_repeated_nan_stops_with_the_step_named(tiny_model_dir, tmp_path, monkeypatch, recwarn):
    import tunesmith
    from tunesmith.errors import UserError
    from tunesmith.training import loop

    real = loop.label_loss_sum
    monkeypatch.setattr(loop, "label_loss_sum", lambda m, b: (real(m, b)[0] * float("inf"), real(m, b)[1]))
    config = json.loads(write_config(tmp_path, tiny_model_dir, "run", max_bad_steps=3, checkpoint_every=0).read_text())
    with pytest.raises(UserError, match="training stopped at step 3: 3 steps in a row.*learning rate"):
        tunesmith.train(config)
    # The schedule moves on past skipped steps on purpose: torch's warning about it is not the user's business.
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def examples_in(batch) -> int:
    """Rows of a padded batch, labelled segments of a padding-free one (not the padding that rounds it up)."""
    if "cu_seq_lens" not in batch:
        return batch["input_ids"].shape[0]
    bounds = batch["cu_seq_lens"].tolist()
    return sum(1 for a, b in zip(bounds[:-1], bounds[1:]) if batch["labels"][0, a:b].ne(-100).any())


def test_out_of_memory_halves_the_micro_batch(tiny_model_dir, tmp_path, monkeypatch):
    import tunesmith
    from tunesmith.training import loop

    real = loop.label_loss_sum
    sizes = []

    def small_memory(model, batch):
        if not model.training:  # evaluation is not what this test squeezes
            return real(model, batch)
        # examples in this forward: rows of a padded batch, sequences of a padding-free one
        sizes.append(examples_in(batch))
        if sizes[-1] > 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(model, batch)

    monkeypatch.setattr(loop, "label_loss_sum", small_memory)
    config = json.loads(write_config(tmp_path, tiny_model_dir, "run", max_steps=2, checkpoint_every=0,
                                     auto_micro_batch=True).read_text())
    results = tunesmith.train(config)
    # the first micro-batch (several of the step's 8 short examples: padding-free it holds up to
    # 4 x 128 tokens), then halves of it, down to one example per forward from then on
    first = sizes.index(1)
    assert results["steps"] == 2 and sizes[0] >= 4 and sizes[1] == math.ceil(sizes[0] / 2)
    assert sizes[:first] == sorted(set(sizes[:first]), reverse=True) and set(sizes[first:]) == {1}


def test_sigterm_while_loading_or_scoring_says_so(tiny_model_dir, tmp_path):
    """The dashboard's Stop during the base model's scoring ended the process without a word (SIGTERM's
    default); outside training's steps it is said, with the signal's exit status."""
    import os
    import subprocess
    import sys
    import time

    script = ("import os, signal, sys\n"
              "from tunesmith import cli\n"
              "def loading(args):\n"
              "    print('loading', flush=True)\n"
              "    import time; time.sleep(60)\n"
              "cli.cmd_plan = loading\n"
              "sys.exit(cli.main(['plan', '--model', 'default']))\n")
    env = {key: value for key, value in os.environ.items() if key != "WORLD_SIZE"}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**env, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout.readline().strip() == "loading"
    time.sleep(0.5)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143 and "stopped by signal 15" in err, err
    assert "Traceback" not in err
