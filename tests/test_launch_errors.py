"""`train --nproc N`: a user's mistake ends as one process's does (one `error:` line, status 2); a rank
that crashes says which rank and how it ended (status 1)."""
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

from helpers import write_jsonl


def config(tmp_path, model_dir, data, **train) -> str:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({
        "model": {"name": str(model_dir), "dtype": "float32"},
        "data": {"train": str(data), "max_seq_len": 64},
        "train": {"max_steps": 2, "batch_size": 2, "device": "cpu", **train},
        "eval": {"generate": False, "report": False},
        "output": {"dir": str(tmp_path / "run")},
    }))
    return str(path)


def train_on_two_ranks(config_path: str, *overrides: str, cwd=None):
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", config_path, *overrides, "--nproc", "2"],
                          capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_missing_data_file_or_scorer_is_said_before_any_rank_starts(tiny_model_dir, tmp_path):
    path = config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "completion": "b"}]))
    missing = train_on_two_ranks(path, "data.train=nosuch.jsonl", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [
        f"error: nosuch.jsonl: data file not found (data.train; a relative path is read from the current folder, "
        f"{tmp_path})"]
    unimportable = train_on_two_ranks(path, "train.objective=grpo", "train.rewards=[nosuchmod:f]", cwd=tmp_path)
    assert unimportable.returncode == 2
    assert unimportable.stderr.splitlines() == [
        "error: scorer 'nosuchmod:f': no module 'nosuchmod' on the path"]


def test_a_mistake_every_rank_finds_is_said_once_with_status_2(tiny_model_dir, tmp_path):
    """Each rank printed it, the lines glued into one, then torchrun's log and `distributed run failed: ====`."""
    unusable = write_jsonl(tmp_path / "unusable.jsonl", [{"foo": 1}, {"foo": 2}])
    done = train_on_two_ranks(config(tmp_path, tiny_model_dir, unusable))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: {unusable}: no usable training examples (2 problems): "
                                        f"{unusable}:1: unknown format: no known fields (keys: foo); map your columns "
                                        "with data.columns, or set data.format (2 like it)"]


def failure(exitcode: int, message: str = "", timestamp: int = 0):
    """A torchrun ProcessFailure as failure_status reads it."""
    return SimpleNamespace(exitcode=exitcode, message=message, timestamp=timestamp,
                           signal_name=lambda: signal.Signals(-exitcode).name)


def test_a_crashed_rank_is_named_with_how_it_ended_and_what_it_said(tmp_path, capsys):
    from tunesmith.training.distributed import failure_status

    log = tmp_path / "run_x" / "attempt_0" / "1" / "stderr.log"
    log.parent.mkdir(parents=True)
    log.write_text("Traceback (most recent call last):\nRuntimeError: rank 1 broke\n")
    # rank 0 ended by torchrun (SIGTERM) after rank 1 crashed: rank 1 is the one to name
    assert failure_status({0: failure(-signal.SIGTERM), 1: failure(1)}, tmp_path) == 1
    assert capsys.readouterr().err.splitlines() == ["Traceback (most recent call last):", "RuntimeError: rank 1 broke",
                                                    "error: distributed run failed: rank 1 exited with 1"]
    assert failure_status({0: failure(-signal.SIGKILL)}, tmp_path) == 1
    assert capsys.readouterr().err == "error: distributed run failed: rank 0 was killed by SIGKILL\n"
    # a mistake on one rank beside a crash on another: the crash is the run's end
    assert failure_status({0: failure(2, "error: bad data"), 1: failure(1)}, tmp_path) == 1
    assert capsys.readouterr().err.endswith("error: distributed run failed: rank 1 exited with 1\n")


def test_the_mistake_a_rank_hands_over_is_read_back_by_torchrun_and_said_once(tmp_path, monkeypatch, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from tunesmith.training.distributed import LAUNCHED, failure_status, tell_launcher

    assert not tell_launcher("error: not a rank")  # one process prints it itself
    failures = {}
    for rank in (0, 1):
        error_file = tmp_path / f"error-{rank}.json"
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        assert not tell_launcher("error: bad data")  # under a torchrun of the user's own: printed, as before
        monkeypatch.setenv(LAUNCHED, "1")
        assert tell_launcher("error: bad data")
        monkeypatch.delenv(LAUNCHED)
        failures[rank] = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=2, error_file=str(error_file))
    assert failure_status(failures, tmp_path) == 2
    assert capsys.readouterr().err == "error: bad data\n"


def test_config_check_imports_the_runs_scorers_before_anything_loads(tiny_model_dir, tmp_path):
    """eval.scorer was imported only after training (each rank's, under --nproc); GRPO's rewards too
    before any rank loaded the model: both are said by `config --check` and before torchrun starts."""
    import pytest

    from tunesmith.api import check_config
    from tunesmith.errors import UserError

    path = config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "completion": "b"}]))
    with pytest.raises(UserError, match="scorer 'nosuchmod:f': no module 'nosuchmod' on the path"):
        check_config(path, ["eval.scorer=nosuchmod:f"])
    (tmp_path / "mine.py").write_text("def f(prediction, reference):\n    return 1.0\n")
    assert check_config(path, [f"eval.scorer={tmp_path / 'mine.py'}:f"]).eval.scorer.endswith("mine.py:f")
    import tunesmith  # one process: said before the model loads (it was said after training, scoring the answers)
    with pytest.raises(UserError, match="scorer 'nosuchmod:f'"):
        tunesmith.train(path, ["eval.scorer=nosuchmod:f", "eval.compare_base=false", "eval.generate=true"])
    assert not (tmp_path / "run").exists()
