"""The dashboard in a real headless browser (Debian's chromium via selenium): start a tiny run from the
form, watch its curve grow, stop it (checkpoint first), resume it, open its report, compare two runs;
and a page of another origin that posts to the dashboard as a web page would, starting nothing.
Screenshots go to tests/ui_artifacts/. Skipped where chromium, chromedriver or selenium is missing."""
from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from helpers import write_jsonl
from test_ui_api import running_dashboard
from tunesmith import runlock

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
SELENIUM = importlib.util.find_spec("selenium") is not None
ARTIFACTS = Path(__file__).parent / "ui_artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1400,1100"]

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER and SELENIUM),
                                reason="chromium / chromedriver / selenium not installed")
if SELENIUM:
    from selenium import webdriver
    from selenium.webdriver.common.by import By


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    with running_dashboard(tmp_path_factory.mktemp("ui-runs")) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    ARTIFACTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def wait_for(predicate, timeout=150.0, every=0.25, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = predicate()
        except Exception:  # the page re-renders under us: try again
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def text_of(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def logged_steps(folder: Path) -> list[int]:
    """Steps of the complete train records in metrics.jsonl."""
    steps = []
    for line in (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "train":
            steps.append(record["step"])
    return steps


def curve_points(driver, series: str = "train loss") -> int:
    return int(driver.find_element(By.CSS_SELECTOR, f'#chart-loss path[data-series="{series}"]').get_attribute("data-points"))


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
def test_dashboard_end_to_end(dashboard, browser, tmp_path, tiny_model_dir, tiny_tokenizer, tiny_config, monkeypatch):
    """One flow, as a user would: each step builds on the run the previous one made."""
    from tunesmith.config import DataConfig
    from tunesmith.data.demo import make_splits
    from tunesmith.data.prepare import prepare
    from tunesmith.ui import launch

    sent, real_stop = [], launch.stop  # the pids the dashboard's Stop has signalled
    monkeypatch.setattr(launch, "stop", lambda folder: sent.append(real_stop(folder)) or sent[-1])

    splits = make_splits(40, seed=4, validation_size=6, test_size=4)
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", rows) for name, rows in splits.items()}
    browser.get(dashboard.url + "#/new")  # the address `tunesmith ui` prints, with the token
    wait_for(lambda: browser.find_element(By.ID, "f-name"), 30, what="the form")
    assert "token" not in browser.current_url and dashboard.token not in browser.current_url  # taken out at once
    form = {"name": "from-form", "model": str(tiny_model_dir), "train": str(files["train"]),
            "validation": str(files["validation"]), "test": str(files["test"]), "max_steps": "30", "batch_size": "2",
            "lr": "1e-2", "log_every": "1", "eval_every": "10", "max_seq_len": "256"}
    for key, value in form.items():
        field = browser.find_element(By.ID, f"f-{key}")
        field.clear()
        field.send_keys(value)
    browser.find_element(By.ID, "f-extra").send_keys("model.dtype=float32\neval.max_new_tokens=8")
    assert not browser.find_element(By.ID, "start").is_enabled()  # the data check and plan come first
    browser.find_element(By.ID, "preview").click()
    wait_for(lambda: browser.find_element(By.ID, "plan-table"), 120, what="the plan")
    assert "optimizer_steps 30" in text_of(browser, "#plan-table")
    prepared = prepare(DataConfig(train=str(files["train"]), validation=str(files["validation"]), test=str(files["test"]),
                                  max_seq_len=256), tiny_tokenizer)
    expected = {name: len(split) for name, split in prepared.splits.items()}
    assert json.dumps(expected, separators=(",", ":")) in text_of(browser, "#data-check-table")
    browser.save_screenshot(str(ARTIFACTS / "1-form-checked.png"))

    browser.find_element(By.ID, "start").click()
    wait_for(lambda: "#/run/from-form" in browser.current_url, 30, what="the run page")
    folder = Path(dashboard.runs_dir) / "from-form"
    pid = wait_for(lambda: runlock.holder(folder), 30, what="the trainer holding the run folder's lock")
    # The trainer is frozen (SIGSTOP) between looks, so the page is checked against known points on any machine speed.
    wait_for(lambda: logged_steps(folder), 120, 0.02, "the first logged step")
    os.kill(pid, signal.SIGSTOP)
    assert wait_for(lambda: text_of(browser, "#run-status") == "running", 30, what="running")
    seen = []
    for _ in range(3):
        steps = logged_steps(folder)
        assert len(steps) < 30, "the run ended before the curve could be watched"
        wait_for(lambda: curve_points(browser) == len(steps), 20, what=f"{len(steps)} points on the curve")
        seen.append(len(steps))
        os.kill(pid, signal.SIGCONT)
        wait_for(lambda: len(logged_steps(folder)) > len(steps), 60, 0.02, "another logged step")
        os.kill(pid, signal.SIGSTOP)
    assert seen == sorted(set(seen)) and len(seen) == 3
    browser.save_screenshot(str(ARTIFACTS / "2-run-training.png"))

    browser.find_element(By.ID, "stop").click()
    # Thawed once the dashboard has sent the SIGTERM (pending in the frozen trainer, acted on when thawed):
    # thawed before, on a busy machine, it trained on to its end.
    wait_for(lambda: sent == [pid], 60, what="the Stop's SIGTERM")
    os.kill(pid, signal.SIGCONT)
    wait_for(lambda: text_of(browser, "#run-status") == "stopped", 60, what="stopped")
    # The lock goes with training's last step; the trainer says why it stopped after that, as it exits.
    [trainer] = [child for child in dashboard.children if child.pid == pid]
    trainer.wait(timeout=240)
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (folder / "checkpoints").iterdir())
    assert checkpoints and checkpoints[-1] < 30 and checkpoints[-1] >= logged_steps(folder)[-1]
    assert "stopped by signal 15; checkpoint saved" in (folder / "train.log").read_text()
    wait_for(lambda: f"step-{checkpoints[-1]:08d}" in text_of(browser, "#checkpoints"), 10, what="the checkpoint listed")
    browser.save_screenshot(str(ARTIFACTS / "3-run-stopped.png"))
    assert browser.find_element(By.ID, "finish").is_displayed()  # ending it here is offered beside resuming

    browser.find_element(By.ID, "resume").click()
    wait_for(lambda: text_of(browser, "#run-status") == "finished", 180, what="finished")
    assert not browser.find_element(By.ID, "finish").is_displayed()
    results = json.loads((folder / "results.json").read_text())
    assert results["resumed_from"] == checkpoints[-1] and results["steps"] == 30
    assert logged_steps(folder) == list(range(1, 31))
    assert wait_for(lambda: curve_points(browser) == 30, 10, what="the whole curve")
    # The report: the page's comparison with the base model holds exactly what results.json holds.
    row = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, '#comparison tr[data-metric="eval_loss"]'), 10)
    cells = [float(c.text) for c in row.find_elements(By.CSS_SELECTOR, "td.base, td.tuned")]
    assert cells == pytest.approx([results["base"]["eval_loss"], results["fine_tuned"]["eval_loss"]], rel=1e-3)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#examples-table tbody tr")) == expected["test"]
    browser.save_screenshot(str(ARTIFACTS / "4-run-finished.png"))
    if importlib.util.find_spec("tunesmith.eval.report"):  # training writes report.html where that feature is present
        wait_for(lambda: browser.find_element(By.ID, "report-report-html"), 10, what="the report link").click()
        browser.switch_to.window(browser.window_handles[-1])
        wait_for(lambda: browser.execute_script("return document.readyState") == "complete", 20)
        assert "report.html" in browser.current_url and browser.find_element(By.TAG_NAME, "body").text.strip()
        browser.save_screenshot(str(ARTIFACTS / "5-report.png"))
        browser.close()
        browser.switch_to.window(browser.window_handles[0])
    compare_with_a_second_run(dashboard, browser, tiny_config, "from-form")


def compare_with_a_second_run(dashboard, browser, tiny_config, first: str):
    """A second run, trained through the Python API, side by side with the first on the compare page."""
    import tunesmith

    runs = Path(dashboard.runs_dir)
    tunesmith.train({**tiny_config, "output": {"dir": str(runs / "lr-low")},
                     "train": {**tiny_config["train"], "lr": 2e-3, "max_steps": 8, "log_every": 2},
                     "eval": {**tiny_config["eval"], "generate": False}})
    pair = (first, "lr-low")
    browser.get(f"http://127.0.0.1:{dashboard.server_address[1]}/#/")  # same tab: the page kept the token
    for name in pair:
        box = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, f'#row-{name} input.pick'), 20, what=name)
        assert browser.find_element(By.CSS_SELECTOR, f"#row-{name}").get_attribute("data-status") == "finished"
        box.click()
    browser.save_screenshot(str(ARTIFACTS / "6-run-list.png"))
    browser.find_element(By.ID, "compare").click()
    wait_for(lambda: browser.find_element(By.ID, "compare-table"), 20, what="the comparison")
    for name, steps in zip(pair, (30, 4)):
        points = int(browser.find_element(By.CSS_SELECTOR, f'#chart-loss path[data-series="{name}"]').get_attribute("data-points"))
        assert points == len(logged_steps(runs / name)) == steps
    row = browser.find_element(By.CSS_SELECTOR, '#config-diff tr[data-key="train.lr"]')
    assert [c.text for c in row.find_elements(By.TAG_NAME, "td")] == ["0.01", "0.002"]
    tuned = browser.find_element(By.CSS_SELECTOR, '#compare-table tr[data-key="fine_tuned.eval_loss"]')
    expected = [json.loads((runs / n / "results.json").read_text())["fine_tuned"]["eval_loss"] for n in pair]
    assert [float(c.text) for c in tuned.find_elements(By.TAG_NAME, "td")] == pytest.approx(expected, rel=1e-3)
    browser.save_screenshot(str(ARTIFACTS / "7-compare.png"))


ATTACK = """<!doctype html><html><body><pre id="done"></pre><script>
// What any page the user visits can do: fetch() with a body that needs no CORS preflight.
const form = FORM;
async function attempt(path, type, mode) {
  try {
    const response = await fetch(TARGET + path, { method: "POST", mode, headers: { "Content-Type": type },
                                                  body: JSON.stringify(form) });
    return `${path} ${type} ${mode}: ${response.type} ${response.status}`;
  } catch (err) {
    return `${path} ${type} ${mode}: ${err.message}`;
  }
}
(async () => {
  const results = [];
  for (const type of ["text/plain", "text/plain; x=application/json", "application/x-www-form-urlencoded"]) {
    results.push(await attempt("/api/runs", type, "no-cors"));
  }
  results.push(await attempt("/api/runs", "application/json", "cors"));  // preflighted: never granted
  document.getElementById("done").textContent = results.join("\\n") + "\\nfinished";
})();
</script></body></html>"""


@contextlib.contextmanager
def page_server(html: str):
    """A plain web server on another port of 127.0.0.1, serving one page."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            payload = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_of_another_origin_starts_nothing(dashboard, browser, tiny_model_dir):
    """A page served from another port of 127.0.0.1 posts the run form to the dashboard with fetch()
    and a text/plain body, as a malicious site could: no run starts."""
    name = "started-by-a-web-page"
    form = {"name": name, "model": str(tiny_model_dir), "train": "demo", "max_steps": "1", "batch_size": "2",
            "max_seq_len": "256", "extra": "model.dtype=float32\neval.generate=false\ndata.demo_size=10"}
    target = f"http://127.0.0.1:{dashboard.server_address[1]}"
    html = ATTACK.replace("FORM", json.dumps(form)).replace("TARGET", json.dumps(target))
    with page_server(html) as address:
        assert address.split(":")[2] != target.split(":")[2]
        browser.get(address)
        report = wait_for(lambda: "finished" in text_of(browser, "#done") and text_of(browser, "#done"), 60,
                          what="the page's requests")
    browser.save_screenshot(str(ARTIFACTS / "0-attack-page.png"))
    assert report.count("/api/runs") == 4, report
    time.sleep(1.0)  # a run started by the requests would have made its folder by now
    assert not (Path(dashboard.runs_dir) / name).exists(), report
    assert name not in json.dumps([c.args for c in dashboard.children])


def test_a_runs_page_shows_its_verdict_and_the_loop_warning(dashboard, browser, tmp_path):
    """The baselines table of a finished run, its verdict and the warning that its answers loop,
    as results.json holds them (text from the run, never markup)."""
    from test_report import fake_run

    run = fake_run(Path(dashboard.runs_dir) / "looping-run")
    results = json.loads((run / "results.json").read_text())
    warning = "warning: 71 of 120 fine-tuned answers loop (half or more of their word 4-grams repeat; base 14) <b>"
    results["baselines"] = {
        "models": {"base": {"rouge_l": 0.141}, "fine-tuned": {"rouge_l": 0.116}}, "primary_metric": "rouge_l",
        "differences": [{"metric": "rouge_l", "baseline": "base", "candidate": "fine-tuned", "difference": -0.025,
                         "low": -0.037, "high": -0.012, "win": 40, "tie": 2, "loss": 78}],
        "verdict": "base beats fine-tuning by +0.025 [+0.012, +0.037] rouge_l: consider it instead",
        "warnings": [warning]}
    (run / "results.json").write_text(json.dumps(results))
    browser.get(dashboard.url + "#/run/looping-run")
    wait_for(lambda: "base beats fine-tuning" in text_of(browser, "#verdict"), 30, what="the verdict")
    shown = [p.text for p in browser.find_elements(By.CSS_SELECTOR, "p.error")]
    assert warning in shown
    assert "-0.025 [-0.037, -0.012]" in text_of(browser, '#baselines tr[data-row="base"]')
