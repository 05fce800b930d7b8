"""Resuming loses nothing and repeats nothing: early stopping across a kill, metrics of a run that
died before its first checkpoint, non-finite steps at checkpoint and signal time, and checkpoint
and result files that survive a crash at any moment."""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers import finished, records, run_cli, start_and_kill_at, trainable, write_config
from tunesmith.config import AdapterConfig
from tunesmith.models import load_model


def early_stop_config(tmp_path, model_dir, run):
    # min_delta 100: no evaluation after the first improves enough, so patience 2 stops at step 6
    # (evaluations at 2, 4, 6), long before max_steps. On the CPU: the resumed runs' weights are compared
    # with torch.equal, and CUDA's attention and reduction kernels need not repeat a run bit for bit.
    path = write_config(tmp_path, model_dir, run, max_steps=20, device="cpu")
    config = json.loads(path.read_text())
    config["eval"].update(every_steps=2, patience=2, min_delta=100.0, restore_best=True)
    config["data"]["validation_share"] = 0.2
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def early_stopped(tiny_model_dir, tmp_path_factory):
    run = finished(early_stop_config(tmp_path_factory.mktemp("early"), tiny_model_dir, "run"))
    return {"run": run, "results": json.loads((run / "results.json").read_text()),
            "weights": load_file(run / "adapter" / "adapter_model.safetensors")}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
def test_early_stopping_survives_a_kill(early_stopped, tiny_model_dir, tmp_path):
    """Killed after two evaluations (one bad), the resumed run stops where the uninterrupted one
    did, with the same restored weights (a fresh stopper would need two more bad evaluations)."""
    assert early_stopped["results"]["early_stopped_at"] == 6 and early_stopped["results"]["steps"] == 6
    config = early_stop_config(tmp_path, tiny_model_dir, "run")
    run = tmp_path / "run"
    assert start_and_kill_at(config, run, 5) == -signal.SIGKILL
    done = run_cli(config)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    results = json.loads((run / "results.json").read_text())
    assert (results["early_stopped_at"], results["steps"]) == (6, 6)
    assert results["best_step"] == early_stopped["results"]["best_step"]
    assert same_weights(load_file(run / "adapter" / "adapter_model.safetensors"), early_stopped["weights"])


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
def test_a_run_killed_after_its_patience_ran_out_does_not_train_on(early_stopped, tmp_path):
    """The state of the early-stop step is in its checkpoint: resumed there (results and weights
    lost to a kill), the run trains no further step and returns the same weights."""
    run = tmp_path / "run"
    shutil.copytree(early_stopped["run"], run)
    for lost in ("results.json", "adapter", "report.html", "report.json"):
        target = run / lost
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    config = json.loads((early_stopped["run"].parent / "run.json").read_text())
    config["output"]["dir"] = str(run)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    done = run_cli(path)
    assert done.returncode == 0, done.stderr
    results = json.loads((run / "results.json").read_text())
    assert (results["steps"], results["early_stopped_at"]) == (6, 6)
    assert max(r["step"] for r in records(run, "train")) == 6
    assert same_weights(load_file(run / "adapter" / "adapter_model.safetensors"), early_stopped["weights"])


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
def test_changed_patience_is_refused_on_resume(tiny_model_dir, tmp_path):
    config = early_stop_config(tmp_path, tiny_model_dir, "run")
    run = tmp_path / "run"
    start_and_kill_at(config, run, 3)
    done = run_cli(config, "eval.patience=5", "eval.restore_best=false", "--resume")
    assert done.returncode == 2
    assert "eval.patience (2 -> 5)" in done.stderr and "eval.restore_best" in done.stderr


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
def test_metrics_of_a_run_killed_before_its_first_checkpoint_are_not_repeated(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, "run", checkpoint_every=0, max_steps=6)
    run = tmp_path / "run"
    assert start_and_kill_at(config, run, 3) == -signal.SIGKILL
    assert not (run / "checkpoints").is_dir() or not any((run / "checkpoints").iterdir())
    done = run_cli(config)
    assert done.returncode == 0, done.stderr
    steps = [r["step"] for r in records(run, "train")]
    assert steps == list(range(1, 7))  # once each: the dead run's records were dropped
    assert [r["step"] for r in records(run, "samples")] == list(range(1, 7))


def test_a_non_finite_step_still_checkpoints_and_stops_on_a_signal(tiny_model_dir, tmp_path, monkeypatch):
    """A step skipped as non-finite is still a step: its checkpoint is written (here the last
    step's), and a signal that arrived during it stops the run there with a checkpoint."""
    import tunesmith
    from tunesmith.errors import Interrupted
    from tunesmith.training import loop

    config = json.loads(write_config(tmp_path, tiny_model_dir, "run", max_steps=4, checkpoint_every=0).read_text())
    real = loop.train_step

    def non_finite_at(step: int, signalled: bool = False):
        done = {"steps": 0}

        def train_step(*args, **kwargs):
            loss, tokens = real(*args, **kwargs)
            done["steps"] += 1
            if done["steps"] != step:
                return loss, tokens
            if signalled:
                os.kill(os.getpid(), signal.SIGTERM)
            return float("nan"), tokens

        return train_step

    monkeypatch.setattr(loop, "train_step", non_finite_at(4))
    results = tunesmith.train(config)
    assert results["skipped_steps"] == [4]
    assert (tmp_path / "run" / "checkpoints" / "step-00000004").is_dir()

    config["output"]["dir"] = str(tmp_path / "run2")
    monkeypatch.setattr(loop, "train_step", non_finite_at(2, signalled=True))
    with pytest.raises(Interrupted) as stopped:
        tunesmith.train(config)
    assert stopped.value.saved.name == "step-00000002"


def _fsynced_paths(monkeypatch) -> list[str]:
    """Record the path of every file or folder handed to os.fsync."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_checkpoint_rename_is_made_durable_and_an_existing_step_never_deleted(tiny_model_dir, tmp_path, monkeypatch):
    from tunesmith.training import checkpoint as ckpt
    from tunesmith.training.schedule import warmup_cosine

    model = trainable(load_model(str(tiny_model_dir)), AdapterConfig(r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = warmup_cosine(optimizer, 10, 1, 0.1)
    folder = tmp_path / "checkpoints"
    synced = _fsynced_paths(monkeypatch)
    first = ckpt.save_checkpoint(folder, model, optimizer, scheduler, ckpt.TrainState(step=2), keep=2)
    assert str(folder) in synced[synced.index(str(first) + ".partial"):]  # the parent, after the new folder
    removed = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: removed.append(str(path)))
    again = ckpt.save_checkpoint(folder, model, optimizer, scheduler, ckpt.TrainState(step=2), keep=2)
    assert again == first and first.is_dir() and str(first) not in removed


def test_results_and_best_weights_are_written_durably(tmp_path, monkeypatch):
    from tunesmith.runs import write_json
    from tunesmith.training.early_stop import BestWeights

    synced = _fsynced_paths(monkeypatch)
    write_json(tmp_path / "results.json", {"steps": 3})
    assert synced[-2:] == [str(tmp_path / "results.json.tmp"), str(tmp_path)]
    assert json.loads((tmp_path / "results.json").read_text()) == {"steps": 3}
    BestWeights(tmp_path / "best.safetensors").offer(torch.nn.Linear(2, 2), 1, 0.5)
    assert synced[-2:] == [str(tmp_path / "best.safetensors.tmp"), str(tmp_path)]


@pytest.mark.slow  # moved out of `make test` (10-minute budget; 53 s); runs in .ci/run's slow set
def test_a_stopped_run_can_end_at_its_checkpoint_with_that_steps_weights(tiny_model_dir, tmp_path):
    """A run stopped before its end has no model yet: a command that needs one says how to go on or
    to end the run there; `train.max_steps=N` (N: the checkpoint's step) ends it without a step
    more and writes the checkpoint's weights as its adapter."""
    import subprocess
    import sys

    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=40)
    run = tmp_path / "run"
    assert start_and_kill_at(config, run, 3, sig=signal.SIGTERM) != 0
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    step = int(checkpoint.name.removeprefix("step-"))
    asked = subprocess.run([sys.executable, "-m", "tunesmith.cli", "generate", str(run), "hello"],
                           capture_output=True, text=True, timeout=120)
    assert asked.returncode == 2
    assert f"training stopped at step {step}" in asked.stderr and f"train.max_steps={step}` ends the run" in asked.stderr
    too_short = run_cli(config, f"train.max_steps={step - 1}")
    assert too_short.returncode == 2 and f"train.max_steps={step} ends the run at it" in too_short.stderr
    ended = run_cli(config, f"train.max_steps={step}")
    assert ended.returncode == 0, ended.stderr
    assert f"ending the run at step {step}" in ended.stderr and "peak training memory" not in ended.stderr
    results = json.loads((run / "results.json").read_text())
    assert (results["steps"], results["resumed_from"], results["tokens_per_second"]) == (step, step, None)
    weights = load_file(checkpoint / "trainable.safetensors")
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == {name.replace(".default", "") for name in weights}
    assert all(torch.equal(adapter[name.replace(".default", "")], value) for name, value in weights.items())


@pytest.mark.slow  # the 10-minute budget of `make test`; runs in .ci/run's slow set
def test_a_resumed_runs_speed_counts_only_the_tokens_it_trained(tiny_model_dir, tmp_path):
    """tokens/s of a resumed run is that process's: it counted the tokens before the checkpoint too. Its
    train_seconds are the whole run's: they were the resumed process's alone."""
    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=8)
    run = tmp_path / "run"
    start_and_kill_at(config, run, 3, sig=signal.SIGTERM)
    before = json.loads((sorted((run / "checkpoints").glob("step-*"))[-1] / "state.json").read_text())["train_seconds"]
    assert before > 0
    done = run_cli(config)
    assert done.returncode == 0, done.stderr
    results = json.loads((run / "results.json").read_text())
    tokens = {r["step"]: r["tokens"] for r in records(run, "train")}
    trained = tokens[8] - tokens[results["resumed_from"]]
    assert 2 <= results["resumed_from"] <= 6 and results["train_tokens"] == tokens[8]
    # train_seconds is rounded to 0.1 s; all the run's tokens over them would be 8/3 to 4/3 times as fast
    assert results["train_seconds"] > before
    assert results["tokens_per_second"] * (results["train_seconds"] - before) == pytest.approx(trained, rel=0.15)


@pytest.mark.slow  # three short runs: the 10-minute budget of `make test`; in .ci/run's slow set
def test_a_resumed_run_logs_as_the_uninterrupted_one_and_resume_false_never_mixes_runs(tiny_model_dir, tmp_path,
                                                                                      monkeypatch):
    """A crash in step 7 (checkpoint at 6), logging every 4 steps: the resumed run's records equal the
    uninterrupted run's, step 8's mean loss over steps 5-8. Then `train.resume=false` in that folder is
    refused: the new run's checkpoints would have been deleted as the oldest beside the old run's."""
    import tunesmith
    import tunesmith.training.loop as loop

    def config(run):
        path = write_config(tmp_path, tiny_model_dir, run, max_steps=10, log_every=4, device="cpu")
        return str(path)
    tunesmith.train(config("whole"))
    real, calls = loop.train_step, []

    def crash_in_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("killed")
        return real(*args, **kwargs)
    monkeypatch.setattr(loop, "train_step", crash_in_step_7)
    with pytest.raises(RuntimeError, match="killed"):
        tunesmith.train(config("resumed"))
    monkeypatch.setattr(loop, "train_step", real)
    with pytest.raises(tunesmith.errors.UserError, match="train.resume=false starts over: set output.overwrite=true"):
        tunesmith.train(config("resumed"), ["train.resume=false"])
    assert tunesmith.train(config("resumed"))["resumed_from"] == 6

    def logged(run):
        return [(r["step"], r["loss"], r.get("mean_loss"), r["lr"]) for r in records(tmp_path / run, "train")]
    assert [r[0] for r in logged("whole")] == [4, 8, 10] and logged("resumed") == logged("whole")


@pytest.mark.slow  # the 10-minute budget of `make test`; runs in .ci/run's slow set
def test_a_run_does_not_resume_over_edited_training_data(tiny_model_dir, tmp_path):
    """A checkpoint holds where the run stood in its shuffled epoch: over other examples that
    means nothing, so a resume after the data file changed is refused with both counts."""
    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=40)
    run = tmp_path / "run"
    start_and_kill_at(config, run, 2)
    data = tmp_path / "qa.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")  # one example fewer
    done = run_cli(config)
    assert done.returncode == 2
    import re

    found = re.search(r"training data changed since this checkpoint \((\d+) examples, \w+ then, (\d+) examples", done.stderr)
    assert found and int(found[2]) == int(found[1]) - 1, done.stderr
    assert "Traceback" not in done.stderr


def test_the_training_data_check_names_the_change_and_accepts_older_checkpoints(tmp_path):
    from tunesmith.data.prepare import Split
    from tunesmith.data.tokenize import Encoded
    from tunesmith.errors import UserError
    from tunesmith.training import checkpoint as ckpt

    split = Split("train", encoded=[Encoded([1, 2, 3], [-100, 2, 3]), Encoded([4, 5], [-100, 5])])
    relabelled = Split("train", encoded=[Encoded([1, 2, 3], [-100, -100, 3]), Encoded([4, 5], [-100, 5])])
    assert ckpt.trained_examples(split).startswith("2 examples, ")
    assert ckpt.trained_examples(split) != ckpt.trained_examples(relabelled)
    (tmp_path / "state.json").write_text(json.dumps({"step": 3, "settings": {
        "train.lr": 0.1, ckpt.DATA_KEY: ckpt.trained_examples(split)}}))
    ckpt.check_same_settings(tmp_path, {"train.lr": 0.1, ckpt.DATA_KEY: ckpt.trained_examples(split)})
    with pytest.raises(UserError, match="training data changed"):
        ckpt.check_same_settings(tmp_path, {"train.lr": 0.1, ckpt.DATA_KEY: ckpt.trained_examples(relabelled)})
    (tmp_path / "state.json").write_text(json.dumps({"step": 3, "settings": {"train.lr": 0.1}}))  # before the check
    ckpt.check_same_settings(tmp_path, {"train.lr": 0.1, ckpt.DATA_KEY: ckpt.trained_examples(relabelled)})


def test_a_refused_resume_leaves_the_run_folders_config_as_it_trained(tiny_model_dir, tmp_path):
    """`train CONFIG train.lr=...` over a stopped run was refused only after the model loaded, and
    config.yaml already held the refused lr: the folder described settings it never trained with
    (the dashboard's Resume reads it)."""
    import tunesmith
    from tunesmith.errors import UserError

    config = json.loads(write_config(tmp_path, tiny_model_dir, "run").read_text())
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "state.json").write_text(json.dumps({"step": 2, "settings": {"train.lr": 0.5}}))
    (run / "config.yaml").write_text("as trained\n")
    with pytest.raises(UserError, match=r"the config changed since this checkpoint, in .*train.lr \(0.5 -> 0.01\)"):
        tunesmith.train(config)
    assert (run / "config.yaml").read_text() == "as trained\n" and not (run / "metrics.jsonl").exists()
