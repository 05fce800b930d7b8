"""One writer per run folder (runlock.py), tried as the issue found it broken: a stale pid file naming a
live unrelated process, two Resume clicks at once, a run started from the terminal."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import write_jsonl
from test_ui_api import call, fake_run, served, wait_for  # noqa: F401 (served: a fixture)
from tunesmith import runlock
from tunesmith.errors import UserError
from tunesmith.ui import folders, launch

HOLD = "import sys, time\nfrom tunesmith.runlock import hold\nwith hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n"


def alive(process: subprocess.Popen) -> bool:
    return process.poll() is None


def test_hold_is_exclusive_and_holder_reads_it(tmp_path):
    folder = tmp_path / "run"
    assert runlock.holder(folder) is None  # no folder, no lock file
    with runlock.hold(folder):
        assert runlock.holder(folder) == os.getpid()
        with pytest.raises(UserError, match=f"{folder}: another training process \\(pid {os.getpid()}\\)"):
            with runlock.hold(folder):
                pass
    assert runlock.holder(folder) is None
    assert not folder.exists()  # a run that wrote nothing leaves nothing, not even its folder
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}")
    with runlock.hold(earlier):
        (earlier / "metrics.jsonl").write_text("")
    assert sorted(p.name for p in earlier.iterdir()) == ["metrics.jsonl", "results.json"]


def test_a_holder_leaving_while_another_opened_the_file_leaves_one_holder(tmp_path, monkeypatch):
    """The holder removes the lock file as it leaves; a writer that opened it just before must not
    end up holding the removed file while a third takes the new one. The instant between the
    writer's open and its flock is too short to hit from threads: the first holder leaves inside it
    here, by a stand-in flock that lets the first holder go before the writer's first exclusive lock."""
    folder = tmp_path / "run"
    first = contextlib.ExitStack()
    first.enter_context(runlock.hold(folder))
    real, left = runlock.fcntl.flock, []

    def flock(fd, operation):
        if operation & runlock.fcntl.LOCK_EX and not left:
            left.append(fd)  # the writer has the old file open now
            first.close()  # the holder leaves: removes .lock (and its empty folder) and drops its lock
        return real(fd, operation)

    monkeypatch.setattr(runlock, "PROBE_GRACE_SECONDS", 0.1)
    monkeypatch.setattr(runlock.fcntl, "flock", flock)
    with runlock.hold(folder):
        assert left  # the race happened: the writer's first lock was on the file removed since
        assert runlock.holder(folder) == os.getpid()  # the folder's own .lock is the one held
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            with runlock.hold(folder):  # so a third is refused
                pass
    assert runlock.holder(folder) is None


def test_a_waiting_writer_takes_the_lock_once_the_holder_leaves(tmp_path, monkeypatch):
    """A second writer started while the first holds the folder retries for PROBE_GRACE_SECONDS and
    takes it once the first leaves; a kill -9 of a holder frees the folder."""
    folder = tmp_path / "run"
    taken, done, refused = [], threading.Event(), threading.Event()
    real_read_pid = runlock._read_pid

    def read_pid(fd):  # _take reads the holder's pid each time its lock is refused
        refused.set()
        return real_read_pid(fd)

    # The first leaves once the second has been refused (not after a fixed sleep, which a busy machine
    # outlasts before the second even tries); the grace outlasts however late the first is in leaving.
    monkeypatch.setattr(runlock, "_read_pid", read_pid)
    monkeypatch.setattr(runlock, "PROBE_GRACE_SECONDS", 120.0)

    def second():
        with runlock.hold(folder):  # waits (PROBE_GRACE_SECONDS) for the first to leave
            taken.append(runlock.holder(folder))
            monkeypatch.setattr(runlock, "PROBE_GRACE_SECONDS", 0.1)  # the third's refusal comes quickly
            with pytest.raises(UserError):
                with runlock.hold(folder):  # a third is refused: the second holds the folder's file
                    pass
            done.wait(30)

    with runlock.hold(folder):
        thread = threading.Thread(target=second)
        thread.start()
        assert refused.wait(120), "the second writer never tried"
    wait_for(lambda: taken, 120)
    assert taken == [os.getpid()] and (folder / runlock.LOCK_FILE).exists()
    done.set()
    thread.join(30)
    assert runlock.holder(folder) is None
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        assert runlock.holder(folder) == child.pid
        with pytest.raises(UserError, match=f"pid {child.pid}"):
            with runlock.hold(folder):
                pass
        child.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        child.wait()
        assert runlock.holder(folder) is None
        with runlock.hold(folder):  # free again
            pass
    finally:
        child.kill()
        child.wait()


def test_a_stale_pid_file_naming_a_live_process_is_not_a_running_run(served, tmp_path):  # noqa: F811
    """The pid of a run that ended now belongs to an unrelated process: the run is not shown as
    running, and Stop does not signal that process."""
    server = served()
    folder = fake_run(tmp_path / "runs", "old", checkpoint=True)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        (folder / "train.pid").write_text(str(bystander.pid))  # what the dashboard used to write
        (folder / runlock.LOCK_FILE).write_text(str(bystander.pid))  # a lock file nobody holds
        assert folders.status(folder) == "stopped"
        assert call(server, "/api/runs/old/metrics")[1]["status"] == "stopped"
        code, body = call(server, "/api/runs/old/stop", {})
        assert code == 400 and "not running" in body["error"]
        with pytest.raises(UserError, match="not running"):
            launch.stop(folder)
        time.sleep(0.2)
        assert alive(bystander)
    finally:
        bystander.kill()
        bystander.wait()


def test_resume_clicked_twice_at_once_starts_one_trainer(served, tmp_path):  # noqa: F811
    server = served()
    fake_run(tmp_path / "runs", "halted", checkpoint=True)
    start, answers = threading.Barrier(4), []

    def click():
        start.wait()
        answers.append(call(server, "/api/runs/halted/resume", {}))

    clicks = [threading.Thread(target=click) for _ in range(4)]
    for thread in clicks:
        thread.start()
    for thread in clicks:
        thread.join(60)
    started = [body for code, body in answers if code == 200]
    refused = [body["error"] for code, body in answers if code != 200]
    assert len(started) == 1 and len(refused) == 3, answers
    assert all("running" in error or "another training process" in error for error in refused), refused
    assert len(server.children) == 1
    # The trainer holds the lock from its first instant (handed over by the dashboard), whatever it then does.
    child = server.children[0]
    os.kill(child.pid, signal.SIGSTOP)
    try:
        assert runlock.holder(tmp_path / "runs" / "halted") == child.pid == started[0]["pid"]
        assert call(server, "/api/runs/halted/resume", {})[0] == 400
    finally:
        os.kill(child.pid, signal.SIGCONT)


def test_a_run_started_in_a_terminal_is_running_and_has_one_writer(served, tmp_path, tiny_model_dir):  # noqa: F811
    """Started with `tunesmith train`, not from the dashboard: the dashboard shows it running, refuses
    to resume it, and Stop signals that process; a second `tunesmith train` on the folder is refused."""
    from tunesmith.data.demo import make_splits

    server = served()
    folder = tmp_path / "runs" / "terminal"
    data = write_jsonl(tmp_path / "train.jsonl", make_splits(24, seed=2, validation_size=0, test_size=0)["train"])
    config = tmp_path / "terminal.json"
    config.write_text(json.dumps({
        "model": {"name": str(tiny_model_dir), "dtype": "float32"}, "data": {"train": str(data), "max_seq_len": 256},
        "train": {"max_steps": 400, "batch_size": 2, "lr": 1e-2, "log_every": 1, "checkpoint_every": 1},
        "eval": {"generate": False}, "output": {"dir": str(folder)}}))
    trainer = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "train", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics = folder / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and '"event": "train"' in metrics.read_text()
                 and (folder / "checkpoints").is_dir(), 240, 0.02)
        os.kill(trainer.pid, signal.SIGSTOP)  # frozen: the checks below see one known state
        assert call(server, "/api/runs/terminal/metrics")[1]["status"] == "running"
        code, body = call(server, "/api/runs/terminal/resume", {})
        assert code == 400 and "running" in body["error"]
        second = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(config), "--resume"],
                                capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr
        assert f"another training process (pid {trainer.pid})" in second.stderr and str(folder) in second.stderr
        code, body = call(server, "/api/runs/terminal/stop", {})
        assert code == 200 and body["stopped"] == trainer.pid
        os.kill(trainer.pid, signal.SIGCONT)
        _, err = trainer.communicate(timeout=240)
        assert trainer.returncode == 143, err
        assert "stopped by signal 15; checkpoint saved" in err
        assert call(server, "/api/runs/terminal/metrics")[1]["status"] == "stopped"
        assert runlock.holder(folder) is None
    finally:
        if trainer.poll() is None:
            os.kill(trainer.pid, signal.SIGCONT)
            trainer.kill()
            trainer.wait()


def test_the_lock_is_released_when_training_fails(tiny_config, monkeypatch):
    """In-process runs (the Python API) hold the lock during the run and give it back however it ends."""
    import tunesmith
    from tunesmith import api

    seen = []

    def failing_fit(*args, **kwargs):
        seen.append(runlock.holder(Path(tiny_config["output"]["dir"])))
        raise RuntimeError("failed in the middle")

    monkeypatch.setattr(api, "fit", failing_fit)
    with pytest.raises(RuntimeError, match="failed in the middle"):
        tunesmith.train(tiny_config)
    assert seen == [os.getpid()]
    assert runlock.holder(Path(tiny_config["output"]["dir"])) is None


def test_a_pid_is_replaced_in_one_write_so_a_reader_never_sees_none(tmp_path, monkeypatch):
    """The holder's pid was written as a truncation then a write: holder() reading between the two (the
    dashboard, as a handed-over lock is adopted) found no pid."""
    fd = os.open(tmp_path / runlock.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    runlock._write_pid(fd, 1234567)  # a longer pid first: none of it may be left after the shorter one
    seen = []
    for name in ("ftruncate", "pwrite"):
        real = getattr(os, name)
        monkeypatch.setattr(runlock.os, name, lambda *args, real=real: seen.append(runlock._read_pid(fd)) or real(*args))
    runlock._write_pid(fd, 42)
    seen.append(runlock._read_pid(fd))
    os.close(fd)
    assert set(seen) <= {1234567, 42} and seen[-1] == 42, seen


def test_a_run_that_is_still_training_is_said_to_be_so_by_what_needs_its_model(tmp_path):
    """export, chat, eval on a run in training said 'no trained model in this run folder', or, once it had
    a checkpoint, 'training stopped at step N' with the command that goes on: a second trainer."""
    from tunesmith.runs import trained_folder

    (tmp_path / "config.yaml").write_text("model: default\n")
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    trainer = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=rf"still training \(process {trainer.pid}\)"):
            trained_folder(tmp_path)
    finally:
        trainer.kill()
        trainer.wait()
    with pytest.raises(UserError, match="no trained model|stopped at step"):
        trained_folder(tmp_path)
    with runlock.hold(tmp_path):  # the trainer itself, at its end
        with pytest.raises(UserError, match="no trained model|stopped at step"):
            trained_folder(tmp_path)
