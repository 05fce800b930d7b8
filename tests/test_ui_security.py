"""The dashboard attacked as a web page, a careless client or a hostile one would: each request is
sent raw, with the exact headers a browser sends, and must start nothing."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import tracemalloc
import urllib.parse

import pytest

from test_ui_api import call, fake_run, served, wait_for  # noqa: F401 (served: a fixture)
from tunesmith.errors import UserError
from tunesmith.ui import make_server

CHROME = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36")


def raw(server, method: str, path: str, headers: dict[str, str], body: bytes = b"", timeout: float = 20.0):
    """(status, parsed JSON body) of one request written byte for byte on a socket that stays open."""
    port = server.server_address[1]
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall("\r\n".join(lines).encode() + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        text = response.read()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


def browser_post(server, path: str, form: dict, **headers) -> tuple[int, dict]:
    """A POST as Chromium sends it for `fetch(url, {method: "POST", body})` from a page on another
    port of 127.0.0.1 (same site, other origin): no preflight is needed for a text/plain body."""
    body = json.dumps(form).encode()
    sent = {"Connection": "keep-alive", "Content-Length": str(len(body)), "User-Agent": CHROME, "Accept": "*/*",
            "Content-Type": "text/plain; x=application/json", "Origin": "http://127.0.0.1:9999",
            "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "empty",
            "Referer": "http://127.0.0.1:9999/", "Accept-Language": "en-US,en;q=0.9"}
    sent.update({key.replace("_", "-"): value for key, value in headers.items()})
    return raw(server, "POST", path, {k: v for k, v in sent.items() if v is not None}, body)


@pytest.fixture
def form(tmp_path, tiny_model_dir):
    """A form that starts a real run when the server takes it."""
    from helpers import write_jsonl
    from tunesmith.data.demo import make_splits

    data = write_jsonl(tmp_path / "train.jsonl", make_splits(12, seed=2, validation_size=0, test_size=0)["train"])
    return {"name": "attack", "model": str(tiny_model_dir), "train": str(data), "max_steps": "2", "batch_size": "2",
            "max_seq_len": "256", "extra": "model.dtype=float32\neval.generate=false"}


def started_nothing(server, tmp_path) -> bool:
    return not (tmp_path / "runs" / "attack").exists() and not server.children


def test_a_cross_site_post_without_token_starts_nothing(served, form, tmp_path):  # noqa: F811
    """The attack of the issue: a page on another port (or another site) posts the run form as
    `text/plain; x=application/json`, which the old substring check took for JSON."""
    server = served()
    code, body = browser_post(server, "/api/runs", form)
    assert code in (401, 403, 415), body
    code, body = browser_post(server, "/api/runs", form, Origin="http://attacker.example",
                              Sec_Fetch_Site="cross-site", Referer="http://attacker.example/")
    assert code in (401, 403, 415), body
    assert started_nothing(server, tmp_path)


def test_each_defence_refuses_on_its_own(served, form, tmp_path):  # noqa: F811
    """Token, exact MIME type, Origin and Sec-Fetch-Site: each alone stops the request."""
    server = served()
    same = {"Origin": f"http://127.0.0.1:{server.server_address[1]}", "Sec_Fetch_Site": "same-origin",
            "Sec_Fetch_Mode": "cors", "Referer": None}
    token = {"X_Tunesmith_Token": server.token}
    json_body = {"Content_Type": "application/json"}
    # Everything right but one thing:
    assert browser_post(server, "/api/runs", form, **same, **json_body)[0] == 401  # no token
    assert browser_post(server, "/api/runs", form, **same, **json_body, X_Tunesmith_Token="guess")[0] == 401
    assert browser_post(server, "/api/runs", form, **same, **token)[0] == 415  # text/plain; x=application/json
    for near_json in ("text/plain", "application/jsonx", "application/x-www-form-urlencoded; a=application/json",
                      "multipart/form-data; boundary=application/json"):
        assert browser_post(server, "/api/runs", form, **same, **token, Content_Type=near_json)[0] == 415, near_json
    assert browser_post(server, "/api/runs", form, **{**same, "Origin": "http://127.0.0.1:9999"}, **token,
                        **json_body)[0] == 403  # another origin
    assert browser_post(server, "/api/runs", form, **{**same, "Origin": "null"}, **token, **json_body)[0] == 403
    for site in ("same-site", "cross-site"):  # another port of 127.0.0.1 is the same site, not the same origin
        assert browser_post(server, "/api/runs", form, **{**same, "Origin": None, "Sec_Fetch_Site": site}, **token,
                            **json_body)[0] == 403, site
    assert started_nothing(server, tmp_path)
    # ... and the same request with everything right is taken (here the preview, which starts nothing).
    code, preview = browser_post(server, "/api/preview", form, **same, **token, Content_Type="application/json; charset=utf-8")
    assert code == 200, preview
    assert preview["plan"]["optimizer_steps"] == 2


@pytest.mark.parametrize("line", ["model.trust_remote_code=true", "model.trust_remote_code=1",
                                  "model.trust_remote_code=True", "eval.scorer=os:system",
                                  "eval.scorer=/tmp/evil.py:run"])
def test_settings_that_run_code_need_allow_code(served, form, tmp_path, line):  # noqa: F811
    server = served()
    attempt = {**form, "extra": form["extra"] + "\n" + line}
    for path in ("/api/runs", "/api/preview"):
        code, body = call(server, path, attempt)
        assert code == 400 and "--allow-code" in body["error"] and line.split("=")[0] in body["error"], (path, body)
    assert started_nothing(server, tmp_path)
    allowing = served(allow_code=True)
    code, body = call(allowing, "/api/preview", attempt)
    assert code == 200, body  # asked for on purpose: `tunesmith ui --allow-code`


def test_the_dashboard_process_never_imports_a_scorer_even_when_allowed(served, form, tmp_path):  # noqa: F811
    """With --allow-code a run may import the user's scorer, in its own training process; the preview
    checks the config without importing it into the long-lived server (a module run at import)."""
    (tmp_path / "marked.py").write_text("import pathlib\npathlib.Path(__file__).with_suffix('.ran').touch()\n"
                                        "def score(answer, reference):\n    return 1.0\n")
    attempt = {**form, "extra": form["extra"] + f"\ntrain.objective=grpo\ntrain.rewards=[{tmp_path / 'marked.py'}:score]"}
    code, body = call(served(allow_code=True), "/api/preview", attempt)
    assert code == 200, body
    assert not (tmp_path / "marked.ran").exists()


def test_negative_or_odd_content_length_is_refused_at_once(served):  # noqa: F811
    """`Content-Length: -1` made the handler read until the client hung up: a blocked thread per request."""
    server = served()
    headers = {"X-Tunesmith-Token": server.token, "Content-Type": "application/json"}
    for length in ("-1", "-100", "1e3", "+5", " 0x10", "99999999999999999999"):
        code, body = raw(server, "POST", "/api/preview", {**headers, "Content-Length": length}, b"{}")
        assert code in (400, 413), (length, code, body)
    code, _ = raw(server, "POST", "/api/preview", {**headers, "Content-Length": "2", "Transfer-Encoding": "chunked"}, b"{}")
    assert code == 501
    doubled = "Content-Length: 2\r\nContent-Length"  # two Content-Length headers
    assert raw(server, "POST", "/api/preview", {**headers, doubled: "3"}, b"{}")[0] == 400
    assert call(server, "/api/runs")[0] == 200  # still serving


def test_a_header_a_decision_is_made_on_is_refused_twice_and_a_get_with_a_body(served):  # noqa: F811
    """Two Origins (or tokens, Hosts...) let one check read one and another check the other; a GET's
    body would be read as the next request. Each alone is refused; the same request without it passes."""
    server = served()
    port = server.server_address[1]
    valid = {"Origin": f"http://127.0.0.1:{port}", "X-Tunesmith-Token": server.token, "Content-Type": "application/json",
             "Sec-Fetch-Site": "same-origin", "Content-Length": "2"}
    code, body = raw(server, "POST", "/api/preview", valid, b"{}")
    assert code == 400 and "more than one" not in body["error"], body  # past the headers: the empty form refused
    for name in ("Origin", "X-Tunesmith-Token", "Content-Type", "Sec-Fetch-Site", "Content-Length", "Host"):
        value = valid.get(name, f"127.0.0.1:{port}")  # raw() writes a Host line of its own
        once = {k: v for k, v in valid.items() if k != name} if name != "Host" else valid
        twice = {**once, (f"{name}: {value}\r\n{name}" if name != "Host" else name): value}
        code, body = raw(server, "POST", "/api/preview", twice, b"{}")
        assert code == 400 and f"more than one {name} header" in body["error"], (name, code, body)
    reading = {"X-Tunesmith-Token": server.token}
    assert raw(server, "GET", "/api/runs", reading)[0] == 200
    code, body = raw(server, "GET", "/api/runs", {**reading, "Content-Length": "2"}, b"{}")
    assert code == 400 and "has no body" in body["error"], body


def test_empty_token_is_refused(tmp_path):
    """`--token ""` turned authentication off, also on 0.0.0.0."""
    for host in ("0.0.0.0", "127.0.0.1"):
        for token in ("", "  "):
            with pytest.raises(UserError, match="empty token"):
                make_server(tmp_path / "runs", host, 0, token)
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "ui", "--runs", str(tmp_path / "runs"), "--host",
                           "0.0.0.0", "--port", "0", "--token", ""], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "empty token" in done.stderr


def test_a_token_from_the_environment_stays_out_of_the_command_line(tmp_path, monkeypatch):
    """`--token` shows in `ps` to every user of the machine; TUNESMITH_UI_TOKEN does not. An empty one
    is refused as `--token ""` is, and --token given still wins."""
    monkeypatch.setenv("TUNESMITH_UI_TOKEN", "from-the-environment")
    server = make_server(tmp_path / "runs", "127.0.0.1", 0)
    try:
        assert server.token == "from-the-environment"
    finally:
        server.server_close()
    given = make_server(tmp_path / "runs", "127.0.0.1", 0, "given")
    try:
        assert given.token == "given"
    finally:
        given.server_close()
    monkeypatch.setenv("TUNESMITH_UI_TOKEN", " ")
    with pytest.raises(UserError, match="empty token"):
        make_server(tmp_path / "runs", "127.0.0.1", 0)


def test_files_are_streamed_not_read_whole(served, tmp_path):  # noqa: F811
    """A large file of a run goes out in pieces: the server never holds it in memory."""
    server = served()
    folder = fake_run(tmp_path / "runs", "big", finished=True)
    size = 48 * 2**20
    with open(folder / "big.bin", "wb") as handle:
        handle.truncate(size)
    port = server.server_address[1]
    tracemalloc.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/api/runs/big/files/big.bin", headers={"X-Tunesmith-Token": server.token})
        response = connection.getresponse()
        received = 0
        while piece := response.read(1 << 16):
            received += len(piece)
        connection.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status == 200 and received == size
    assert peak < size / 8, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"


def test_report_links_are_signed_for_their_file_alone(served, tmp_path):  # noqa: F811
    """A report opens in a new tab, which cannot send the token: its address is signed for that file."""
    server = served()
    folder = fake_run(tmp_path / "runs", "done", finished=True)
    (folder / "report.html").write_text("<html><body>the report</body></html>")
    (folder / "other.txt").write_text("other")
    link = call(server, "/api/runs/done")[1]["links"]["report.html"]
    assert server.token not in link and "token" not in link
    assert call(server, link, token=False) == (200, "<html><body>the report</body></html>")
    signature = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["sig"][0]
    assert call(server, f"/api/runs/done/files/other.txt?sig={signature}", token=False)[0] == 401
    tampered = signature[:-1] + ("1" if signature[-1] == "0" else "0")  # one character changed, always
    assert call(server, f"/api/runs/done/files/report.html?sig={tampered}", token=False)[0] == 401
    assert call(server, link, headers={"Sec-Fetch-Site": "cross-site"}, token=False)[0] == 403
    port = server.server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", link)
    response = connection.getresponse()
    response.read()
    assert "sandbox" in response.getheader("Content-Security-Policy")  # no script of a run's file runs as the dashboard


def test_slow_clients_do_not_hold_the_server(served):  # noqa: F811
    """A request cut off half way blocks only its own connection, and only until the timeout."""
    server = served()
    port = server.server_address[1]
    stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
    stalled.sendall(b"POST /api/preview HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
    results = []
    thread = threading.Thread(target=lambda: results.append(call(server, "/api/runs")[0]))
    thread.start()
    thread.join(30)
    stalled.close()
    assert results == [200]


def free_slots(server) -> int:
    """Connections the server would take now; read, not taken, so its own accepts never race this."""
    return server.slots._value


def test_a_trickling_client_is_dropped_and_idle_connections_cannot_take_every_thread(served, monkeypatch):  # noqa: F811
    """Slowloris: one header line every few seconds kept a connection (and its thread) for ever,
    since the timeout was per read; a thousand idle connections took every file handle."""
    import select
    import time

    from tunesmith.ui import server as dashboard

    monkeypatch.setattr(dashboard, "REQUEST_SECONDS", 2)
    monkeypatch.setattr(dashboard, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(dashboard.Handler, "timeout", 2)  # IDLE_SECONDS
    server = served()
    port = server.server_address[1]
    trickling = socket.create_connection(("127.0.0.1", port), timeout=30)
    trickling.sendall(b"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    dropped_after = None
    began = time.monotonic()
    for _ in range(20):  # a header line a second, the request never finished
        time.sleep(1)
        try:
            trickling.sendall(b"X-Slow: 1\r\n")
            closed = select.select([trickling], [], [], 0)[0] and trickling.recv(1) == b""
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        if closed:
            dropped_after = time.monotonic() - began
            break
    trickling.close()
    assert dropped_after is not None, "the trickling connection was never dropped"
    for _ in range(50):  # its thread gone (it gives its slot back as it ends)
        if call(server, "/api/runs")[0] == 200:
            break
        time.sleep(0.2)
    # a loaded machine may not have ended the answering thread yet: wait for every slot, then
    # for the three idle connections to hold them all (as the CI run of 2026-12-07 showed)
    wait_for(lambda: free_slots(server) == 3, timeout=10)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
    wait_for(lambda: free_slots(server) == 0, timeout=10)
    extra = socket.create_connection(("127.0.0.1", port), timeout=30)
    extra.sendall(b"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert extra.recv(100) == b""  # past the cap: closed unanswered
    extra.close()
    wait_for(lambda: free_slots(server) == 3, timeout=15)  # the idle ones pass their deadline, free their threads
    assert call(server, "/api/runs")[0] == 200
    for sock in idle:
        sock.close()


def test_sigterm_while_a_connections_thread_starts_stops_the_server(served):  # noqa: F811
    """SIGTERM raises Terminated wherever the main thread is; in Thread.start, after the connection's
    thread began (and here ended), its slot was given back twice: the ValueError took the Terminated's
    place, socketserver logged it and served on, and `tunesmith ui` outlived its SIGTERM (make test of
    2026-12-07: terminate() then 30 s without an exit)."""
    from tunesmith.errors import Terminated

    server = served()
    free = free_slots(server)
    start = threading.Thread.start

    def start_then_signal(thread):
        start(thread)
        thread.join(30)  # the connection served (it is closed), its slot given back
        raise Terminated(15)

    mine, theirs = socket.socketpair()
    theirs.close()
    threading.Thread.start = start_then_signal
    try:
        with pytest.raises(Terminated):
            server.process_request(mine, ("127.0.0.1", 1))
    finally:
        threading.Thread.start = start
    assert free_slots(server) == free


def test_grpo_rewards_run_code_and_need_allow_code_too(served, form, tmp_path):  # noqa: F811
    """train.rewards imports `module:function` (or a file) like eval.scorer: it was let through."""
    server = served()
    attempt = {**form, "extra": form["extra"] + "\ntrain.objective=grpo\ntrain.rewards=[/tmp/evil.py:run]"}
    for path in ("/api/runs", "/api/preview"):
        code, body = call(server, path, attempt)
        assert code == 400 and "train.rewards" in body["error"] and "--allow-code" in body["error"], (path, body)
    assert started_nothing(server, tmp_path)


def test_a_run_resumed_or_finished_from_the_page_is_judged_like_a_new_one(served, tmp_path):  # noqa: F811
    """A stopped run's config.yaml naming a scorer (written in the terminal, or copied in) is not run from
    the page without --allow-code."""
    import yaml

    folder = fake_run(tmp_path / "runs", "stopped", checkpoint=True)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "eval": {"scorer": "/tmp/evil.py:run"}}))
    server = served()
    for action in ("resume", "finish"):
        code, body = call(server, f"/api/runs/stopped/{action}", {})
        assert code == 400 and "eval.scorer" in body["error"] and "--allow-code" in body["error"], body
    assert not server.children


def test_a_body_the_route_leaves_unread_is_not_the_next_request(served, tmp_path):  # noqa: F811
    """The page sends `{}` with Stop; a refused stop left it in the connection, and the next request on it
    (the page's poll) was read as `{}GET ...`: 501."""
    fake_run(tmp_path / "runs", "done", finished=True)
    server = served()
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=20)
    headers = {"X-Tunesmith-Token": server.token, "Content-Type": "application/json"}
    connection.request("POST", "/api/runs/done/stop", body=b"{}", headers=headers)
    stopped = connection.getresponse()
    assert stopped.status == 400 and b"not running" in stopped.read()
    connection.request("GET", "/api/runs", headers=headers)
    listed = connection.getresponse()
    assert listed.status == 200 and json.loads(listed.read())["runs"][0]["name"] == "done"
    connection.close()


def test_the_printed_address_carries_any_token_intact(tmp_path):
    for token in ("s3cr+t", "a&b=c", "p#ss", "100%ok"):
        server = make_server(tmp_path / "runs", port=0, token=token)
        try:
            query = urllib.parse.urlsplit(server.url).query
            assert urllib.parse.parse_qs(query)["token"] == [token]
        finally:
            server.server_close()


def test_a_run_folder_with_links_writes_through_none(served, tmp_path):  # noqa: F811
    """A shared run folder whose .lock and train.log link to the user's files: the page does not list
    it and will not resume it, and neither the dashboard nor `tunesmith train` writes through the links
    (the pid truncated the lock's target, the child's output was appended to ~/.bashrc)."""
    from tunesmith import runlock

    folder = fake_run(tmp_path / "runs", "shared", checkpoint=True)
    victims = {name: tmp_path / f"victim-{name.strip('.')}" for name in (".lock", "train.log")}
    for name, victim in victims.items():
        victim.write_text("precious\n")
        (folder / name).symlink_to(victim)
    server = served()
    code, runs = call(server, "/api/runs")
    assert code == 200 and "shared" not in [run["name"] for run in runs["runs"]]
    for action in ("resume", "finish", "stop"):
        code, body = call(server, f"/api/runs/shared/{action}", {})
        assert code == 404, (action, body)
    assert runlock.holder(folder) is None  # whatever holds the lock's target is not this run
    for name in (".lock", "train.log"):
        (folder / name).unlink()
    (folder / "metrics.jsonl").rename(tmp_path / "victim-metrics")
    (folder / "metrics.jsonl").symlink_to(tmp_path / "victim-metrics")
    with pytest.raises(UserError, match=r"metrics.jsonl: a symbolic link in a run folder"):
        with runlock.hold(folder):
            pass
    assert all(victim.read_text() == "precious\n" for victim in victims.values())
    assert not (folder / ".lock").exists()


def test_the_dashboards_trainer_imports_nothing_from_the_working_folder(tmp_path):
    """A cloned project's argparse.py (or yaml.py) in the folder the dashboard runs in: `python -m`
    puts that folder first on the module path, so the trainer it starts ran it."""
    from tunesmith.entry import SAFE_ENTRY

    marker = tmp_path / "ran"
    (tmp_path / "argparse.py").write_text(f"open({str(marker)!r}, 'w').write('project code ran')\n"
                                          "raise SystemExit(3)\n")
    attacked = subprocess.run([sys.executable, "-m", "tunesmith.cli", "--help"], cwd=tmp_path, capture_output=True)
    assert marker.exists() and attacked.returncode == 3  # what the dashboard and torchrun did
    marker.unlink()
    safe = subprocess.run([sys.executable, "-c", SAFE_ENTRY, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert safe.returncode == 0 and "tunesmith" in safe.stdout and not marker.exists()


def test_the_report_runs_no_script_whatever_the_metrics_hold(tmp_path):
    """metrics.jsonl's keys name the report's plots: a run folder from elsewhere put markup there."""
    from html.parser import HTMLParser

    from tunesmith.eval.report import render_html

    class Tags(HTMLParser):
        found: list = []

        def handle_starttag(self, tag, attrs):
            self.found.append((tag, dict(attrs)))

    from tunesmith.eval.report import collect

    names = {"validation_<script>alert(1)</script>": "AAAA", "objective/<img src=x onerror=alert(2)>": "AAAA"}
    page = render_html(collect(fake_run(tmp_path / "runs", "shared", finished=True)), names)
    parser = Tags()
    parser.feed(page)
    assert not [tag for tag, _ in parser.found if tag == "script"]
    assert not [attrs for tag, attrs in parser.found if "onerror" in attrs]
    assert "default-src 'none'" in page


def test_a_config_of_aliases_or_shorthand_breaks_no_run_list(served, tmp_path):  # noqa: F811
    folder = fake_run(tmp_path / "runs", "short")
    (folder / "config.yaml").write_text("model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    bomb = fake_run(tmp_path / "runs", "bomb")
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]"
        for i in range(6)]
    (bomb / "config.yaml").write_text("\n".join(levels) + "\ntrain: {max_steps: *g}\n")
    server = served()
    code, runs = call(server, "/api/runs")
    assert code == 200
    shown = {run["name"]: run for run in runs["runs"]}
    assert shown["short"]["model"] == "SmolLM2-135M-Instruct"
    code, text = call(server, "/api/runs/bomb")
    assert code == 200 and len(json.dumps(text)) < 100_000


def test_what_other_commands_write_into_a_run_folder_goes_through_no_link(tmp_path):
    """results.json.tmp planted as a link to a user's file, and a run folder whose export/ is a link:
    the results are written beside and renamed (the link replaced), and export refuses the folder."""
    from tunesmith.export import export
    from tunesmith.runs import write_json

    folder = fake_run(tmp_path / "runs", "shared", finished=True)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (folder / "results.json.tmp").symlink_to(victim)
    write_json(folder / "results.json", {"steps": 3})
    assert victim.read_text() == "precious\n" and json.loads((folder / "results.json").read_text()) == {"steps": 3}
    (tmp_path / "elsewhere").mkdir()
    (folder / "export").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="export: a symbolic link in a run folder"):
        export(folder, formats="hf")
    assert not any((tmp_path / "elsewhere").iterdir())
