"""The dashboard's JSON API over run folders: what it reads, the token, paths outside the runs folder,
and starting / stopping / resuming a real run in a child process."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import write_jsonl
from tunesmith.errors import UserError
from tunesmith.ui import make_server
from tunesmith.ui.folders import inside, status

SECRET = "content-outside-the-runs-folder"


def fake_run(runs: Path, name: str, *, finished=False, checkpoint=False, nan=False) -> Path:
    """A run folder as the CLI writes it (config, metrics, results), written by hand to test the reader."""
    folder = runs / name
    folder.mkdir(parents=True)
    config = {"model": {"name": "/models/tiny-llama"}, "data": {"train": "/data/train.jsonl"},
              "adapter": {"method": "lora"}, "train": {"max_steps": 4, "lr": 0.01}, "output": {"dir": str(folder)}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"event": "train", "step": s, "loss": 3.0 - 0.5 * s, "lr": 0.01, "grad_norm": 1.0,
                "tokens_per_second": 100.0, "time": 1000.0 + s} for s in (1, 2, 3)]
    records.insert(2, {"event": "eval", "step": 2, "eval_loss": 2.5, "perplexity": 12.2, "time": 1002.5})
    if nan:
        records.append({"event": "skipped_step", "step": 4, "loss": float("nan"), "grad_norm": float("inf")})
    write_jsonl(folder / "metrics.jsonl", records)
    with open(folder / "metrics.jsonl", "a") as handle:
        handle.write('{"event": "train", "step": 4, "lo')  # a record still being written
    if checkpoint:
        (folder / "checkpoints" / "step-3").mkdir(parents=True)
    if finished:
        results = {"base": {"eval_loss": 3.1, "json_valid": 0.0}, "fine_tuned": {"eval_loss": 2.2, "json_valid": 0.5},
                   "data": {"examples": {"train": 40}}, "train_seconds": 9.5}
        (folder / "results.json").write_text(json.dumps(results))
        write_jsonl(folder / "predictions.jsonl", [{"prompt": "p1", "reference": "r1", "answer": "tuned answer"}])
        write_jsonl(folder / "predictions_base.jsonl", [{"prompt": "p1", "reference": "r1", "answer": "base answer"}])
    return folder


@contextlib.contextmanager
def running_dashboard(runs: Path, host: str = "127.0.0.1", token: str | None = None, allow_code: bool = False):
    """A dashboard serving from a thread on a free port; its training children are killed afterwards."""
    server = make_server(runs, host, 0, token, allow_code)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        for child in server.children:
            if child.poll() is None:
                child.kill()
                child.wait()


@pytest.fixture
def served(tmp_path):
    """Yields a function that starts a dashboard over tmp_path/runs."""
    with contextlib.ExitStack() as stack:
        yield lambda host="127.0.0.1", token=None, allow_code=False: stack.enter_context(
            running_dashboard(tmp_path / "runs", host, token, allow_code))


def call(server, path, body=None, headers=None, host=None, token=True):
    """(status, parsed JSON or text) of one request, with the server's token (token=False: without);
    `host` connects to that address instead."""
    port = server.server_address[1]
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"X-Tunesmith-Token": server.token, **(headers or {})} if token else dict(headers or {})
    request = urllib.request.Request(f"http://{host or '127.0.0.1'}:{port}{path}", data=data, headers=headers)
    if isinstance(body, dict):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            code, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        code, text = err.code, err.read().decode()
    try:
        return code, json.loads(text)
    except ValueError:
        return code, text


def test_lists_and_details_runs_from_their_folders(served, tmp_path):
    server = served()
    runs = tmp_path / "runs"
    fake_run(runs, "done", finished=True, nan=True)
    fake_run(runs, "halted", checkpoint=True)
    fake_run(runs, "broken")
    (runs / "not-a-run").mkdir()  # no config.yaml: not listed

    code, listing = call(server, "/api/runs")
    assert code == 200
    rows = {r["name"]: r for r in listing["runs"]}
    assert set(rows) == {"done", "halted", "broken"}
    assert [rows[n]["status"] for n in ("done", "halted", "broken")] == ["finished", "stopped", "failed"]
    assert rows["done"]["model"] == "tiny-llama" and rows["done"]["data"] == "train.jsonl"
    assert rows["done"]["best_eval"] == 2.2  # results beat the in-training eval of 2.5
    assert rows["halted"]["best_eval"] == 2.5 and rows["halted"]["step"] == 3

    code, detail = call(server, "/api/runs/done")
    assert code == 200
    assert detail["results"]["fine_tuned"]["eval_loss"] == 2.2
    assert detail["predictions"] == [{"prompt": "p1", "reference": "r1", "fine_tuned": "tuned answer", "base": "base answer"}]
    assert detail["data_check"] == {"examples": {"train": 40}}
    assert "tiny-llama" in detail["config_text"]

    code, metrics = call(server, "/api/runs/done/metrics")
    steps = [(r["event"], r["step"]) for r in metrics["records"]]
    assert steps == [("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("skipped_step", 4)]  # half line left out
    assert metrics["records"][-1]["loss"] is None  # NaN -> null: browsers cannot parse NaN


def test_a_foreign_run_folder_cannot_break_the_run_list(served, tmp_path, monkeypatch):
    """Run folders copied from elsewhere: one file of an unexpected shape made /api/runs fail for
    every run (a 500, or a 404 named after a missing key)."""
    server = served()
    runs = tmp_path / "runs"
    fake_run(runs, "good", finished=True)
    (fake_run(runs, "deep") / "results.json").write_text("[" * 100_000 + "]" * 100_000)
    (fake_run(runs, "odd-results") / "results.json").write_text(json.dumps({"fine_tuned": "x", "data": [1]}))
    write_jsonl(fake_run(runs, "odd-metrics") / "metrics.jsonl", [{"event": "train"}, {"event": "train", "step": "2"}])
    code, listing = call(server, "/api/runs")
    assert code == 200, listing
    rows = {r["name"]: r for r in listing["runs"]}
    assert set(rows) == {"good", "deep", "odd-results", "odd-metrics"}
    assert rows["good"]["best_eval"] == 2.2 and rows["odd-metrics"]["step"] == 0
    for name in ("deep", "odd-results", "odd-metrics"):
        code, detail = call(server, f"/api/runs/{name}")
        assert code == 200 and detail["name"] == name, (name, detail)
    # Whatever else a folder may hold that its reader does not expect: that run is listed as unreadable.
    from tunesmith.ui import folders

    real = folders.summary
    monkeypatch.setattr(folders, "summary", lambda f: real(f) if f.name != "deep" else {}["surprise"])
    rows = {r["name"]: r for r in call(server, "/api/runs")[1]["runs"]}
    assert rows["deep"]["status"] == "unreadable" and "surprise" in rows["deep"]["error"]
    assert rows["good"]["status"] == "finished"


def test_report_files_are_served_when_present(served, tmp_path):
    server = served()
    folder = fake_run(tmp_path / "runs", "done", finished=True)
    assert call(server, "/api/runs/done")[1]["reports"] == []
    (folder / "report.html").write_text("<html><body>the report</body></html>")
    assert call(server, "/api/runs/done")[1]["reports"] == ["report.html"]
    assert call(server, "/api/runs/done/files/report.html") == (200, "<html><body>the report</body></html>")
    assert call(server, "/api/runs/done/files/nothing.html")[0] == 404


def test_refuses_paths_outside_the_runs_folder(served, tmp_path):
    server = served()
    runs = tmp_path / "runs"
    fake_run(runs, "done", finished=True)
    outside = tmp_path / "outside"
    fake_run(outside.parent / "outside-runs", "elsewhere", finished=True)
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    os.symlink(outside / "secret.txt", runs / "done" / "link.txt")
    os.symlink(tmp_path / "outside-runs" / "elsewhere", runs / "linked-run")
    attempts = ["/api/runs/done/files/../../outside/secret.txt", "/api/runs/done/files/%2e%2e/%2e%2e/outside/secret.txt",
                "/api/runs/done/files/..%2f..%2foutside%2fsecret.txt", f"/api/runs/done/files/{outside}/secret.txt",
                f"/api/runs/done/files/%2F{str(outside / 'secret.txt').lstrip('/').replace('/', '%2F')}",
                "/api/runs/done/files/link.txt", "/api/runs/..%2Foutside-runs%2Felsewhere", "/api/runs/%2E%2E",
                "/api/runs/linked-run", "/api/runs/linked-run/files/results.json", "/api/runs/done%2F..%2F..%2Foutside"]
    for path in attempts:
        code, body = call(server, path)
        assert code in (400, 404), (path, code)
        assert SECRET not in json.dumps(body) and "fine_tuned" not in json.dumps(body), path
    fake_run(runs, "clean", finished=True)
    # Neither the symlinked run nor one holding a link (tunesmith makes none) is listed
    assert [r["name"] for r in call(server, "/api/runs")[1]["runs"]] == ["clean"]
    with pytest.raises(UserError, match="outside"):
        inside(runs, "../outside/secret.txt")
    with pytest.raises(UserError, match="outside"):  # a sibling whose name starts with the runs folder's
        inside(runs, "../runs-private/secret.txt")
    with pytest.raises(UserError, match="not a path inside"):
        inside(runs, str(outside / "secret.txt"))
    with pytest.raises(UserError, match="outside"):
        inside(runs / "done", "link.txt")
    assert inside(runs, "done/results.json") == (runs / "done" / "results.json").resolve()


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_token_required_on_every_api_request(served, host):
    """On localhost too: any web page the user visits can reach 127.0.0.1. Only as a header: a token
    in an address would stay in the browser's history and in logs."""
    server = served(host=host)
    token = server.token
    assert token and len(token) >= 24 and token in server.url
    for path in ("/api/runs", "/api/runs/x/metrics", f"/api/runs?token={token[:-1]}", f"/api/runs?token={token}"):
        assert call(server, path, token=False)[0] == 401, path
    assert call(server, "/api/runs", headers={"X-Tunesmith-Token": "wrong"}, token=False)[0] == 401
    assert call(server, "/api/runs", {"name": "x"}, token=False)[0] == 401  # starting a run too
    assert call(server, "/api/runs", headers={"X-Tunesmith-Token": token}, token=False)[0] == 200
    assert call(server, "/", token=False)[0] == 200  # the page itself holds no data; it reads the token from its address
    other = make_server(server.runs_dir, host, 0)
    other.server_close()
    assert other.token != token  # a new one for every start

    local = served()
    # Bound to localhost: only local Host names (no DNS rebinding), only JSON POSTs (no CSRF forms).
    assert call(local, "/api/runs", headers={"Host": "attacker.example:80"})[0] == 403
    for host in ("192.168.1.5:80", "[::1].attacker.example", "127.0.0.1:80:80"):
        assert call(local, "/api/runs", headers={"Host": host})[0] == 403, host
    assert call(local, "/api/runs", headers={"Host": "[::1]:8765"})[0] == 200
    # Bound to every address: IP addresses and the machine's own names, never a name someone else chose.
    shared = served(host="0.0.0.0")
    for host in ("attacker.example", "attacker.example:8765", "localhost.attacker.example", "[::1].evil"):
        assert call(shared, "/api/runs", headers={"Host": host})[0] == 403, host
        assert call(shared, "/", headers={"Host": host}, token=False)[0] == 403, host
    for host in ("192.168.1.5:8765", "[fe80::1]:8765", "localhost:8765", f"{socket.gethostname()}:8765"):
        assert call(shared, "/api/runs", headers={"Host": host})[0] == 200, host
    aliased = make_server(shared.runs_dir, "0.0.0.0", 0, allow_hosts=["GPU01.lab.example"])  # --allow-host NAME
    threading.Thread(target=aliased.serve_forever, daemon=True).start()
    try:
        assert call(aliased, "/api/runs", headers={"Host": "gpu01.lab.example:8765"})[0] == 200
        assert call(aliased, "/api/runs", headers={"Host": "attacker.example:8765"})[0] == 403
    finally:
        aliased.shutdown()
        aliased.server_close()
    assert call(local, "/api/preview", b"name=x", {"Content-Type": "application/x-www-form-urlencoded"})[0] == 415


def test_bad_form_input_is_a_clear_error(served, tmp_path):
    server = served()
    form = {"name": "../escape", "model": "default", "train": "demo"}
    code, body = call(server, "/api/runs", form)
    assert code == 400 and "run name '../escape'" in body["error"]
    code, body = call(server, "/api/preview", {**form, "name": "ok", "lr": "-1"})
    assert code == 400 and "train.lr" in body["error"]
    code, body = call(server, "/api/runs", {**form, "name": "ok", "train": str(tmp_path / "missing.jsonl")})
    assert code == 400 and "missing.jsonl: data file not found" in body["error"]
    code, body = call(server, "/api/runs", {**form, "name": "ok", "extra": "train.lr 3"})
    assert code == 400 and "line 1" in body["error"]
    assert not (tmp_path / "runs" / "ok").exists()
    fake_run(tmp_path / "runs", "taken", finished=True)
    code, body = call(server, "/api/runs", {**form, "name": "taken"})
    assert code == 400 and "exists" in body["error"]


def wait_for(predicate, timeout=180.0, every=0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


# In the slow set (.ci/run runs it): 48 s of `make test`, whose runs read 553-640 s on 2 cores on 2026-12-07;
# tests/test_ui_browser.py starts a real run from the dashboard in `make test`.
@pytest.mark.slow
def test_start_and_stop_a_real_run(served, tmp_path, tiny_model_dir):
    """A run started through the API trains in a child process; stopping it writes a checkpoint first."""
    from tunesmith.data.demo import make_splits

    server = served()
    data = write_jsonl(tmp_path / "train.jsonl", make_splits(24, seed=2, validation_size=0, test_size=0)["train"])
    form = {"name": "real", "model": str(tiny_model_dir), "train": str(data), "max_steps": "400", "batch_size": "2",
            "lr": "1e-2", "log_every": "1", "max_seq_len": "256", "extra": "model.dtype=float32\neval.generate=false"}
    code, preview = call(server, "/api/preview", form)
    assert code == 200, preview
    assert preview["plan"]["optimizer_steps"] == 400
    assert sum(preview["data_check"]["examples"].values()) == 24
    # The plan of `tunesmith plan CONFIG`: the run's own micro-batches (and padding), not 2 x 256 tokens
    assert "the data's largest micro-batch" in preview["plan_text"], preview["plan_text"]

    code, started = call(server, "/api/runs", form)
    assert code == 201, started
    folder = tmp_path / "runs" / "real"
    assert (folder / "config.yaml").exists()
    metrics = lambda: call(server, "/api/runs/real/metrics")[1]  # noqa: E731
    wait_for(lambda: len([r for r in metrics()["records"] if r["event"] == "train"]) >= 3)
    assert metrics()["status"] == "running"
    code, body = call(server, "/api/runs/real/stop", {})
    assert code == 200 and body["stopped"] == started["pid"]
    wait_for(lambda: metrics()["status"] != "running")
    assert status(folder) == "stopped"
    # The lock goes with training's last step; the trainer says why it stopped after that, as it exits.
    [trainer] = [child for child in server.children if child.pid == started["pid"]]
    trainer.wait(timeout=240)
    checkpoint_steps = [int(p.name.split("-")[1]) for p in (folder / "checkpoints").iterdir()]
    last_logged = max(r["step"] for r in metrics()["records"] if r["event"] == "train")
    assert max(checkpoint_steps) >= last_logged
    assert "stopped by signal 15; checkpoint saved" in (folder / "train.log").read_text()
    assert call(server, "/api/runs/real/stop", {})[0] == 400  # not running any more
    # Finish: the stopped run ends at its checkpoint, its model written with that step's weights; not
    # without the token, nor from another origin
    assert call(server, "/api/runs/real/finish", {}, token=False)[0] == 401
    assert call(server, "/api/runs/real/finish", {}, headers={"Origin": "http://attacker.example"})[0] == 403
    assert status(folder) == "stopped"
    code, body = call(server, "/api/runs/real/finish", {})
    assert code == 200, body
    wait_for(lambda: metrics()["status"] == "finished")
    results = json.loads((folder / "results.json").read_text())
    assert results["steps"] == results["resumed_from"] == max(checkpoint_steps) and (folder / "adapter").is_dir()
    assert call(server, "/api/runs/real/finish", {})[0] == 400  # finished: nothing to end


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_cli_prints_the_token_and_the_server_requires_it(tmp_path, host):
    """`tunesmith ui`: the printed address carries a token, on localhost too, and the API refuses requests without it."""
    import re
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "ui", "--runs", str(tmp_path / "runs"),
                              "--host", host, "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        first = child.stdout.readline()
        found = re.search(rf"http://{re.escape(host)}:(\d+)/\?token=(\S+)", first)
        assert found, first
        port, token = found.groups()
        assert f"token: {token}" in child.stdout.readline()
        url = f"http://127.0.0.1:{port}/api/runs"
        for address in (url, f"{url}?token={token}"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(address, timeout=30)
            assert refused.value.code == 401
        request = urllib.request.Request(url, headers={"X-Tunesmith-Token": token})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read()) == {"runs": []}
    finally:
        child.terminate()
        child.wait(timeout=30)


def test_a_runs_objective_is_shown_beside_its_method_and_an_earlier_run_as_its_base(tmp_path):
    from tunesmith.ui.folders import summary

    for objective, shown in (("dpo", "lora, dpo"), ("sft", "lora")):
        folder = tmp_path / objective
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump({"adapter": {"method": "lora"},
                                                            "train": {"objective": objective}}))
        assert summary(folder)["method"] == shown
    # a run started from an earlier run: its config names that run's merge, which read as "merged"
    earlier = fake_run(tmp_path / "runs", "sft", finished=True)
    for model, shown in ((earlier / "export" / "merged", "run sft"), (earlier / "model", "run sft"),
                         (tmp_path / "models" / "base", "base")):
        (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"name": str(model)}}))
        assert summary(folder)["model"] == shown, model


def test_a_moved_run_goes_on_in_the_folder_it_is_in(tmp_path, monkeypatch):
    """Its config.yaml names the folder it was trained in; Resume trained there (from step 0, the
    checkpoints being here) and left this folder unfinished."""
    import types

    from tunesmith.ui import launch

    folder = fake_run(tmp_path / "runs", "old", checkpoint=True)
    moved = folder.rename(tmp_path / "runs" / "moved")
    started = []
    monkeypatch.setattr(launch.subprocess, "Popen",
                        lambda args, **kw: started.append(args) or types.SimpleNamespace(pid=os.getpid()))
    launch.resume(moved)
    assert started[0][-1] == f"output.dir={moved.absolute()}" and str(folder) not in started[0][-1]


def test_a_run_the_dashboard_starts_does_not_inherit_its_token(tmp_path, monkeypatch):
    """The dashboard's token from TUNESMITH_UI_TOKEN went to every trainer it started, where a run's own
    scorer or reward function could read it."""
    import types

    from tunesmith.ui import launch

    monkeypatch.setenv("TUNESMITH_UI_TOKEN", "secret")
    folder = fake_run(tmp_path / "runs", "old", checkpoint=True)
    environments = []
    monkeypatch.setattr(launch.subprocess, "Popen",
                        lambda args, **kw: environments.append(kw["env"]) or types.SimpleNamespace(pid=os.getpid()))
    launch.resume(folder)
    assert "TUNESMITH_UI_TOKEN" not in environments[0] and environments[0]["PYTHONUNBUFFERED"] == "1"


def test_overwrite_starts_a_finished_run_over_and_resumes_an_unfinished_one(tmp_path):
    """`tunesmith demo` (output.overwrite on) stopped with Ctrl-C and run again: it went back to step 0,
    its checkpoints deleted."""
    from tunesmith.runs import RunFolder

    unfinished = fake_run(tmp_path, "unfinished", checkpoint=True)
    RunFolder(unfinished).prepare(overwrite=True)
    assert (unfinished / "checkpoints" / "step-3").is_dir() and (unfinished / "metrics.jsonl").exists()
    RunFolder(unfinished).prepare(overwrite=True, resume=False)
    assert not (unfinished / "checkpoints").exists()
    finished = fake_run(tmp_path, "finished", finished=True, checkpoint=True)
    # the earlier model's answers and report went into the new run's report as its own
    earlier = ("predictions.jsonl", "predictions_base.jsonl", "predictions_rag.jsonl", "report.html", "report.json")
    for name in earlier + ("pairs.jsonl",):
        (finished / name).write_text("{}\n")
    RunFolder(finished).prepare(overwrite=True)
    assert not (finished / "checkpoints").exists() and not (finished / "results.json").exists()
    assert not [name for name in earlier if (finished / name).exists()]
    assert (finished / "pairs.jsonl").exists()  # `tunesmith pairs` output: data a later DPO run may read
