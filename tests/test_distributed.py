"""Two processes on torch.distributed (gloo, CPU) give the weights one process gives with the same global batch."""
import contextlib
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import write_jsonl

HERE = Path(__file__).parent
STEPS = 4


def rows(n=40):
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    return [{"prompt": f"Repeat: {' '.join(words[(i + k) % 7] for k in range(1 + i % 6))} {i}",
             "completion": f"{' '.join(words[(i + k) % 7] for k in range(1 + i % 6))} {i}"} for i in range(n)]


def write_config(tmp_path: Path, model_dir: Path, run: str, method="lora", evaluation: dict | None = None,
                 dropout: float = 0.0, **train) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl", rows())
    config = {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "data": {"train": str(data), "max_seq_len": 128},
        "adapter": {"method": method, "r": 4, "dropout": dropout},
        # On the CPU (gloo) wherever CUDA is visible too: two ranks on one GPU would ask for cuda:1, and the
        # one-process runs they are compared with must compute on the same device.
        "train": {"max_steps": STEPS, "batch_size": 4, "grad_accum": 2, "lr": 1e-2 if method != "full" else 1e-3,
                  "log_every": 1, "device": "cpu", **train},
        "eval": {"generate": False, "report": False, **(evaluation or {})},
        "output": {"dir": str(tmp_path / run)},
    }
    path = tmp_path / f"{run}.json"
    path.write_text(json.dumps(config))
    return path


def env():
    # One thread per rank: two ranks on two cores, no oversubscription.
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def train(config: Path, nproc: int = 1, timeout=300, **popen):
    command = [sys.executable, "-m", "tunesmith.cli", "train", str(config)] + (["--nproc", str(nproc)] if nproc > 1 else [])
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env(), **popen)


def weights(run: Path) -> dict:
    folder = run / "adapter" if (run / "adapter").is_dir() else run / "model"
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(folder / name)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("method, train_opts", [
    # All in the slow set (`make test` keeps 2 ranks in tests/test_accumulation.py, the raw gradients).
    pytest.param("lora", {}, marks=pytest.mark.slow),
    # full-ddp and lora-fsdp2 repeat the mechanisms of lora-ddp and full-fsdp2: `long` (make test-slow) keeps
    # .ci/run within its 90 minutes.
    pytest.param("full", {}, marks=pytest.mark.long),  # the same mechanism as lora-ddp, all weights
    pytest.param("full", {"fsdp": True}, marks=pytest.mark.slow),
    # the frozen base sharded, adapters trained
    pytest.param("lora", {"fsdp": True}, marks=pytest.mark.long),
    # FSDP2's CPU offload policy: the shards held on the host between uses (on CPU ranks a no-op move, but
    # FSDP2's offloading code path: host gradients, optimizer step on them)
    pytest.param("full", {"fsdp": True, "fsdp_offload": True}, marks=pytest.mark.long),
], ids=["lora-ddp", "full-ddp", "full-fsdp2", "lora-fsdp2", "full-fsdp2-offload"])
def test_two_ranks_equal_one_process(method, train_opts, tiny_model_dir, tmp_path):
    one = train(write_config(tmp_path, tiny_model_dir, "one", method))
    assert one.returncode == 0, one.stderr
    two = train(write_config(tmp_path, tiny_model_dir, "two", method, **train_opts), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / run / "metrics.jsonl")) if r.get("event") == "train"]
              for run in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # logged once (rank 0), the global step loss


@pytest.mark.slow
def test_resume_after_kill_with_two_ranks(tiny_model_dir, tmp_path):
    opts = {"checkpoint_every": 1, "max_steps": 10}
    reference = train(write_config(tmp_path, tiny_model_dir, "reference", **opts))
    assert reference.returncode == 0, reference.stderr
    config = write_config(tmp_path, tiny_model_dir, "run", **opts)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "train", str(config), "--nproc", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and any(
                json.loads(line).get("step", 0) >= 3 for line in open(run / "metrics.jsonl") if line.endswith("\n")):
            break
        time.sleep(0.02)
    # The launcher and both ranks die at once, as on a lost machine (the ranks run in sessions of their own).
    import psutil

    family = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run / "results.json").exists(), "the run finished before it could be killed"
    resumed = train(config, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert max_diff(weights(tmp_path / "reference"), weights(run)) < 1e-5


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
def test_a_failing_rank_ends_the_job(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=50)
    # A hang guard, not a speed check: the surviving rank would otherwise wait in a collective for
    # the process group's default 30-minute timeout; torchrun ends it as soon as rank 1 fails.
    try:
        done = patched(config, "broken", timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("rank 0 was still waiting 120 s after rank 1 failed")
    assert done.returncode != 0
    assert "rank 1 broke on purpose" in done.stderr


@pytest.mark.slow
def test_a_stopped_two_rank_run_has_time_to_write_a_slow_checkpoint(tiny_model_dir, tmp_path):
    """SIGTERM to the launcher (a scheduler's stop; Ctrl-C reaches it too): the ranks finish their step
    and write their checkpoint, here 40 s long. torchrun's own 30-second grace killed them while
    they wrote it, and the stopped run had nothing to resume from."""
    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=500)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(HERE / "dist_launch_patched.py"), str(config), "slow-save"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (
                (run / "metrics.jsonl").exists() and any(json.loads(line).get("step", 0) >= 2
                                                         for line in open(run / "metrics.jsonl") if line.endswith("\n"))):
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=240)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    from tunesmith.training.checkpoint import complete_checkpoints

    assert complete_checkpoints(run / "checkpoints"), output[-3000:]
    assert output.count("checkpoint saved") == 1, output[-3000:]  # said once, by rank 0
    assert "error" not in output.rpartition("checkpoint saved")[2] and proc.returncode == 128 + signal.SIGTERM


def patched(config: Path, mode: str, timeout: int = 300):
    """`train config` on two ranks under torchrun, changed as tests/dist_patched.py's MODE says."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "dist_patched.py"), str(config), mode],
                          capture_output=True, text=True, timeout=timeout, env=env())


def cut_back_to_before_its_last_step(run: Path, steps: int) -> None:
    """A finished run as it was killed in its last step: that step's checkpoint, results and adapter gone."""
    import shutil

    shutil.rmtree(run / "checkpoints" / f"step-{steps:08d}")
    shutil.rmtree(run / "adapter")
    (run / "results.json").unlink()


@pytest.mark.slow
def test_two_ranks_resume_with_their_best_weights_and_restore_them_as_one(tiny_model_dir, tmp_path):
    """Only rank 0 reopened the best weights on a resume: at the end it restored them (through the
    wrapper's collectives) while rank 1, knowing no best step, went on to the final evaluation, and
    the two waited on each other for ever. The resumed run ends as the uninterrupted one did."""
    opts = {"max_steps": 6, "checkpoint_every": 1, "evaluation": {"every_steps": 2}}
    whole, cut = (write_config(tmp_path, tiny_model_dir, name, **opts) for name in ("whole", "cut"))
    for config in (whole, cut):
        done = patched(config, "worse-eval-from-3")  # base, step 2: as they are; steps 4 and 6: worse
        assert done.returncode == 0, done.stderr[-3000:]
    assert "restored the weights of step 2" in done.stderr
    cut_back_to_before_its_last_step(tmp_path / "cut", 6)
    try:
        resumed = patched(cut, "worse-eval-from-2", timeout=180)  # base, then step 6: worse
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks of the resumed run waited on each other")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 5" in resumed.stderr and "restored the weights of step 2" in resumed.stderr
    assert max_diff(weights(tmp_path / "whole"), weights(tmp_path / "cut")) < 1e-6


@pytest.mark.slow
def test_a_two_rank_run_with_dropout_resumes_to_the_uninterrupted_runs_weights(tiny_model_dir, tmp_path):
    """Checkpoints kept rank 0's random state alone, and every rank resumed with it: rank 1's dropout
    masks after the resume were not those it would have drawn (weights 1e-3 off the uninterrupted run's)."""
    whole, cut = (write_config(tmp_path, tiny_model_dir, name, max_steps=6, checkpoint_every=1, dropout=0.1)
                  for name in ("whole", "cut"))
    for config in (whole, cut):
        done = train(config, nproc=2)
        assert done.returncode == 0, done.stderr[-3000:]
    cut_back_to_before_its_last_step(tmp_path / "cut", 6)
    resumed = train(cut, nproc=2)
    assert resumed.returncode == 0 and "resuming from step 5" in resumed.stderr, resumed.stderr[-3000:]
    assert max_diff(weights(tmp_path / "whole"), weights(tmp_path / "cut")) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp2_keeps_and_restores_the_best_weights_of_its_shards(method, tiny_model_dir, tmp_path):
    """FSDP2 with evaluations during training failed at the first one: the best weights were DTensors,
    which safetensors cannot save. Each rank keeps its own shards; restored, they equal one process's.
    full: an evaluation left the root's weights (embeddings, final norm) gathered, and the restore
    wrote the best ones into that copy, which was dropped: the saved model mixed the steps."""
    opts = {"max_steps": 6, "evaluation": {"every_steps": 2}}
    one = write_config(tmp_path, tiny_model_dir, "one", method, **opts)
    two = write_config(tmp_path, tiny_model_dir, "two", method, fsdp=True, **opts)
    done = subprocess.run([sys.executable, str(HERE / "dist_patched.py"), str(one), "worse-eval-from-3"],
                          capture_output=True, text=True, timeout=300, env=env())
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = patched(two, "worse-eval-from-3")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "restored the weights of step 2" in done.stderr and "restored the weights of step 2" in sharded.stderr
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5


@pytest.mark.slow
def test_an_fsdp2_checkpoint_resumes_in_one_process_and_holds_no_frozen_base(tiny_model_dir, tmp_path):
    """Sharded checkpoints were saved with the wrapper's keys, so one process could not resume them (a
    checkpoint library traceback), and with the frozen base of an adapter run in each (a 70B base
    in every checkpoint)."""
    import torch.distributed.checkpoint as dcp

    opts = {"max_steps": 6, "checkpoint_every": 1, "fsdp": True}
    whole, cut = (write_config(tmp_path, tiny_model_dir, name, **opts) for name in ("whole", "cut"))
    for config in (whole, cut):
        done = train(config, nproc=2)
        assert done.returncode == 0, done.stderr[-3000:]
    saved = dcp.FileSystemReader(str(tmp_path / "cut" / "checkpoints" / "step-00000006" / "sharded"))
    keys = [k for k in saved.read_metadata().state_dict_metadata if k.startswith("model.")]
    assert keys and all(k.startswith("model.base_model.model.") for k in keys)  # the model's own names
    assert any("lora_A" in k for k in keys) and not any("base_layer" in k for k in keys)
    cut_back_to_before_its_last_step(tmp_path / "cut", 6)
    resumed = train(cut)  # one process, the config unchanged
    assert resumed.returncode == 0 and "resuming from step 5" in resumed.stderr, resumed.stderr[-3000:]
    assert max_diff(weights(tmp_path / "whole"), weights(tmp_path / "cut")) < 1e-6


@pytest.mark.slow
def test_an_out_of_memory_error_on_one_rank_ends_the_job_with_a_message(tiny_model_dir, tmp_path):
    """train.auto_micro_batch halved the micro-batch on the rank that ran out of memory alone: its
    collectives then paired with another step's on the other rank, and the job hung."""
    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=6, auto_micro_batch=True)
    try:
        done = patched(config, "oom", timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks hung after one ran out of memory")
    assert done.returncode != 0
    assert re.search(r"out of memory at step \d", done.stderr) and "with several ranks nothing retries" in done.stderr


def _killed_single_process_run(tiny_model_dir, tmp_path):
    """A run with checkpoints of steps 3..5 (at least), killed before its end."""
    from helpers import start_and_kill_at

    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=10, checkpoint_every=1, keep_checkpoints=3)
    start_and_kill_at(config, tmp_path / "run", 5)
    assert not (tmp_path / "run" / "results.json").exists(), "the run finished before it could be killed"
    return config


def _resume_on_two_ranks(config: Path, mode: str):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "dist_resume_rank.py"), str(config), mode],
                          capture_output=True, text=True, timeout=300, env=env())


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
def test_rank_0_picks_the_checkpoint_every_rank_resumes_from(tiny_model_dir, tmp_path):
    """Rank 1 would pick another checkpoint than rank 0 (a node whose view differs): it resumes
    from rank 0's choice, and the job ends with the weights of an uninterrupted run."""
    reference = train(write_config(tmp_path, tiny_model_dir, "reference", max_steps=10, checkpoint_every=1))
    assert reference.returncode == 0, reference.stderr
    done = _resume_on_two_ranks(_killed_single_process_run(tiny_model_dir, tmp_path), "older")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = {line.split("resuming from step ")[1].split()[0] for line in done.stderr.splitlines()
               if "resuming from step " in line}
    assert len(resumed) == 1  # both ranks (rank 1's lines are in the same stream) at the same step
    assert max_diff(weights(tmp_path / "reference"), weights(tmp_path / "run")) < 1e-5


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
def test_a_rank_that_cannot_load_the_chosen_checkpoint_fails_the_job_with_a_message(tiny_model_dir, tmp_path):
    done = _resume_on_two_ranks(_killed_single_process_run(tiny_model_dir, tmp_path), "unreadable")
    assert done.returncode != 0
    assert "rank 1: cannot load checkpoint" in done.stderr and "chosen by rank 0" in done.stderr


@pytest.mark.slow
def test_a_sharded_run_saves_its_weights_and_scores_as_one_process_or_says_it_cannot(tiny_model_dir, tmp_path):
    """After FSDP2, rank 0 loaded the whole base again before saving anything: a base sharded because it
    does not fit on one device would have lost the trained adapter there. The weights are written first;
    the model is scored as one process scores it where it fits, and not scored, said, where it does not."""
    test = write_jsonl(tmp_path / "test.jsonl", rows(46)[40:])
    evaluation = {"generate": True, "max_new_tokens": 8, "report": True}
    configs = {}
    for run in ("one", "two", "full"):
        configs[run] = write_config(tmp_path, tiny_model_dir, run, evaluation=evaluation,
                                    **({} if run == "one" else {"fsdp": True}))
        config = json.loads(configs[run].read_text())
        config["data"]["test"] = str(test)
        configs[run].write_text(json.dumps(config))
    one, two = train(configs["one"]), train(configs["two"], nproc=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    results = {run: json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two")}
    scored, base = ([{k: v for k, v in results[run][model].items() if k != "generated_tokens_per_second"}
                     for run in ("one", "two")] for model in ("fine_tuned", "base"))
    assert "answer_loss" in scored[0] and "test_examples" in scored[0], scored
    assert scored[1] == pytest.approx(scored[0], abs=1e-4)
    # the base scored by rank 0's whole model, the eval loss by the shards: as one process scores them
    assert base[1] == pytest.approx(base[0], abs=1e-4) and "answer_loss" in base[0]
    assert (results["two"]["fast_paths"], results["two"]["batch_layout"]) == (results["one"]["fast_paths"],
                                                                              results["one"]["batch_layout"])
    no_room = patched(configs["full"], "no-room")  # rank 0's device with 1 KiB free at the end
    assert no_room.returncode == 0, no_room.stderr[-3000:]
    assert "the fine-tuned model is not scored here: whole, it takes" in no_room.stderr
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "full")) < 1e-5  # saved all the same
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert "answer_loss" not in results["fine_tuned"] and (tmp_path / "full" / "report.html").exists()
    assert results["not_scored"].endswith("GiB free on cpu") and "not_scored" not in results_of_two(tmp_path)


def results_of_two(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "two" / "results.json").read_text())


@pytest.mark.slow
def test_an_fsdp2_run_loads_the_whole_base_on_rank_0_alone(tiny_model_dir, tmp_path):
    """Every rank loaded the whole model onto its device before sharding it, so a base larger than one
    device could not start. The ranks now shard a weightless skeleton, rank 0 reads the base into host
    memory and sends each rank its shard; the base is scored on test answers only where it fits."""
    test = write_jsonl(tmp_path / "test.jsonl", rows(46)[40:])
    configs = {run: write_config(tmp_path, tiny_model_dir, run, evaluation={"generate": True, "max_new_tokens": 8},
                                 **({"fsdp": True} if run == "two" else {})) for run in ("one", "two")}
    for config in configs.values():
        settings = json.loads(config.read_text())
        settings["data"]["test"] = str(test)
        config.write_text(json.dumps(settings))
    one, two = train(configs["one"]), patched(configs["two"], "loads-no-room-at-start")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    assert (tmp_path / "loads.txt").read_text().split() == ["0"]  # once, at the start, and by rank 0 alone
    assert "the base is not scored on test answers or the general probe here: whole, it takes" in two.stderr
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5
    results = results_of_two(tmp_path)
    assert results["not_scored"].startswith("whole, it takes") and "answer_loss" not in results["fine_tuned"]
    assert "answer_loss" not in results["base"] and results["base"]["eval_loss"] > results["fine_tuned"]["eval_loss"]


@pytest.mark.slow
def test_a_bf16_full_fine_tune_trains_sharded_as_one_process(tiny_model_dir, tmp_path):
    """Mixed precision (fp32 weights, bf16 matmuls under autocast) was set up for the device the weights
    were on: FSDP2's weightless (meta) skeleton refused it, so every bf16 full fine-tune with train.fsdp
    failed at its start. Equal to one process within bf16's summation-order differences."""
    for run, nproc, opts in (("one", 1, {}), ("two", 2, {"fsdp": True})):
        config = write_config(tmp_path, tiny_model_dir, run, "full", **opts)
        settings = json.loads(config.read_text())
        settings["model"]["dtype"] = "bfloat16"
        config.write_text(json.dumps(settings))
        done = train(config, nproc=nproc)
        assert done.returncode == 0, done.stderr[-3000:]
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / run / "metrics.jsonl")) if r.get("event") == "train"]
              for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4) and losses[0][-1] < losses[0][0]
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 5e-3  # 0.001 measured
