"""The run report: report.json holds the figures, report.html is self-contained and renders its
pictures in a real browser (headless Chromium, network off)."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tunesmith.eval.report import loss_markers, train_loss, write_report

from helpers import write_jsonl


def fake_run(folder):
    """A run folder as training and `compare` leave it."""
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "default"}, "train": {"lr": 0.001}}))
    records = [{"event": "train", "step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3 * (1 - s / 20),
                "tokens_per_second": 400 + s, "grad_norm": 1.0} for s in range(1, 21)]
    records += [{"event": "eval", "step": s, "eval_loss": 2.5 - 0.05 * s, "perplexity": 10.0} for s in (5, 10, 15, 20)]
    records[3:4] = [{**records[3], "mean_loss": 2.75}]  # step 4 logged its interval's mean
    records.append({"event": "early_stop", "step": 20, "best_step": 15, "best_eval_loss": 1.75})
    records.append({"event": "restore_best", "step": 20, "best_step": 15, "eval_loss": 1.75})
    records.append({"event": "eval", "step": 20, "eval_loss": 1.75})  # the kept weights, evaluated again
    write_jsonl(folder / "metrics.jsonl", records + ['{"event": "train", "step": 21, "lo'])  # a line cut by a crash
    (folder / "results.json").write_text(json.dumps({
        "data": {"examples": {"train": 90, "validation": 10}, "tokens": {"train": 9000}, "dropped": {"empty": 2}},
        "steps": 20, "final_loss": 1.0, "base": {"eval_loss": 2.5}, "fine_tuned": {"eval_loss": 1.75}}))
    (folder / "comparison.json").write_text(json.dumps({
        "data": "test.jsonl", "examples_scored": 2,
        "models": {"default": {"answer_loss": 2.4, "rouge_l": 0.12}, "run": {"answer_loss": 1.8, "rouge_l": 0.2}},
        "differences": [{"metric": "rouge_l", "baseline": "default", "candidate": "run", "difference": 0.08,
                         "low": 0.02, "high": 0.14, "win": 2, "tie": 0, "loss": 0}]}))
    write_jsonl(folder / "comparison.jsonl", [{"prompt": "What is <b>A1C</b>?", "reference": "A blood test.",
                                               "default": {"answer": "No idea"}, "run": {"answer": "A blood test."}}])
    return folder


def test_report_json_holds_the_figures(tmp_path):
    html_path, json_path = write_report(fake_run(tmp_path / "run"))
    report = json.loads(json_path.read_text())
    assert [r["step"] for r in report["curves"]["train"]] == list(range(1, 21))
    # The curve is what training measured; the kept weights' evaluation at the end is the marker's
    assert [r["eval_loss"] for r in report["curves"]["eval"]] == [2.25, 2.0, 1.75, 1.5]
    assert loss_markers(report["events"]) == [(20, ":", "early stop (step 20)"),
                                              (15, "--", "best eval loss, weights kept (step 15)")]
    label, rows, key = train_loss(report["curves"]["train"])
    assert label.startswith("train loss (mean") and [r[key] for r in rows][2:5] == [2.7, 2.75, 2.5]
    assert report["comparison"]["differences"][0]["high"] == 0.14
    assert report["data"]["examples"]["train"] == 90 and report["events"][-1]["best_step"] == 15
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 3  # loss, learning rate, tokens/s
    assert "[+0.0200, +0.1400]" in page and "2 / 0 / 0" in page
    assert "What is &lt;b&gt;A1C&lt;/b&gt;?" in page  # model text is escaped, never markup
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page), "the report must not fetch anything"


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    from tunesmith.errors import UserError

    with pytest.raises(UserError, match=r"not a run folder \(no config.yaml\)"):
        write_report(tmp_path)
    with pytest.raises(UserError, match="missing: no such run folder"):  # said 'not a run folder (no config.yaml)'
        write_report(tmp_path / "missing")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK_IMAGES = """<script>
window.addEventListener('load', () => {
  const sizes = Array.from(document.images).map(i => i.complete + ':' + i.naturalWidth + 'x' + i.naturalHeight);
  const out = document.createElement('pre'); out.id = 'image-check'; out.textContent = sizes.join(' ');
  document.body.appendChild(out);
});
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def rendered(page: Path, profile: Path) -> str:
    """The page's DOM after headless Chromium ran it, offline."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",  # offline
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)


def test_report_renders_with_its_pictures_in_headless_chromium(tmp_path):
    """The images decode; and the report's policy runs no script, so one that a run folder's text
    smuggled in does nothing (here the image check itself, which runs once the policy is taken out)."""
    from tunesmith.eval.report import NO_SCRIPTS

    html_path, _ = write_report(fake_run(tmp_path / "run"))
    probe = tmp_path / "probe.html"  # the report plus a script that writes each image's decoded size into the page
    probe.write_text(html_path.read_text().replace(NO_SCRIPTS, "").replace("</body>", CHECK_IMAGES))
    done = rendered(probe, tmp_path / "profile")
    found = re.search(r'<pre id="image-check">([^<]*)</pre>', done.stdout)
    assert found, f"page did not render: {done.stderr[-500:]}"
    sizes = found.group(1).split()
    assert len(sizes) == 3
    assert all(s == "true:600x320" for s in sizes), sizes  # 6 x 3.2 inches at 100 dpi, decoded
    probe.write_text(html_path.read_text().replace("</body>", CHECK_IMAGES))  # the policy kept
    done = rendered(probe, tmp_path / "profile")
    assert "<h1>tunesmith run report</h1>" in done.stdout and 'id="image-check"' not in done.stdout


def test_smoothed_loss_is_a_debiased_moving_average_and_figures_read_as_numbers():
    from tunesmith.eval.report import _fmt, smoothed

    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: not pulled towards 0
    noisy = [3.0, 1.0] * 20
    trend = smoothed(noisy)
    assert trend[0] == 3.0 and max(trend[10:]) - min(trend[10:]) < 0.5 < max(noisy) - min(noisy)
    assert _fmt(674.7) == "674.7" and _fmt(0.14061) == "0.1406" and _fmt(139399488) == "139,399,488"
    assert _fmt(True) == "True" and _fmt(None) == "-"
    # A skipped step's NaN loss is passed over (every later point was NaN, the curve gone)
    assert smoothed([2.0, float("nan"), 2.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_a_run_that_kept_its_weights_by_a_generation_metric_plots_it(tmp_path):
    """eval.best_metric=rouge_l: the validation answers' ROUGE-L gets its own chart, marked at the kept step."""
    from tunesmith.eval.report import collect, figures

    run = fake_run(tmp_path / "run")
    records = [json.loads(line) for line in open(run / "metrics.jsonl") if line.strip().endswith("}")]
    for r in records:
        if r["event"] == "eval":
            r["validation_rouge_l"] = r["step"] / 100
        if r["event"] == "restore_best":
            r["metric"] = "rouge_l"
    write_jsonl(run / "metrics.jsonl", records)
    report = collect(run)
    assert [r["validation_rouge_l"] for r in report["curves"]["eval"]] == [0.05, 0.1, 0.15, 0.2]
    assert set(figures(report)) == {"loss", "validation_rouge_l", "learning_rate", "tokens_per_second"}
    assert (15, "--", "best rouge_l, weights kept (step 15)") in loss_markers(report["events"])


def test_without_a_comparison_each_answer_sits_beside_the_base_answer_of_its_own_line(tmp_path):
    """Matched by prompt text, a prompt asked twice (two references) showed the base's last answer to it
    beside both fine-tuned answers."""
    from tunesmith.eval.report import collect

    run = fake_run(tmp_path / "run")
    (run / "comparison.json").unlink()
    (run / "comparison.jsonl").unlink()
    rows = [("Reset my password", "Use the link.", "first base", "first tuned"),
            ("Reset my password", "Call support.", "second base", "second tuned"),
            ("Refund?", "Yes.", "third base", "third tuned")]
    write_jsonl(run / "predictions.jsonl", [{"prompt": p, "reference": r, "answer": t} for p, r, _, t in rows])
    write_jsonl(run / "predictions_base.jsonl", [{"prompt": p, "reference": r, "answer": b} for p, r, b, _ in rows])
    shown = [(e["base"]["answer"], e["fine-tuned"]["answer"]) for e in collect(run)["examples"]]
    assert shown == [("first base", "first tuned"), ("second base", "second tuned"), ("third base", "third tuned")]


def test_a_later_compare_is_shown_beside_the_runs_own_verdict_not_in_its_place(tmp_path):
    """`compare --limit 8` after training replaced the run's 5-row table (its k-shot and retrieval
    baselines) and its verdict in report.html and in the model card: both are shown now, the run's first."""
    from tunesmith.export.card import comparison_sections

    run = fake_run(tmp_path / "run")
    results = json.loads((run / "results.json").read_text())
    results["fine_tuned"]["test_examples"] = 16
    results["baselines"] = {
        "models": {"base": {"rouge_l": 0.10}, "base + retrieval": {"rouge_l": 0.30}, "fine-tuned": {"rouge_l": 0.31}},
        "differences": [{"metric": "rouge_l", "baseline": "base + retrieval", "candidate": "fine-tuned",
                         "difference": 0.006, "low": -0.026, "high": 0.042, "win": 5, "tie": 6, "loss": 5}],
        "verdict": "base + retrieval is as good: consider it"}
    (run / "results.json").write_text(json.dumps(results))
    page = Path(write_report(run)[0]).read_text()
    order = [page.index(text) for text in ("<h3>At the end of training</h3>", "base + retrieval is as good",
                                           "<h3>tunesmith compare</h3>", "Scored on 2 examples from test.jsonl")]
    assert order == sorted(order)
    assert "[-0.0260, +0.0420]" in page and "[+0.0200, +0.1400]" in page  # both tables' intervals
    card = "\n".join(comparison_sections(results, json.loads((run / "comparison.json").read_text())))
    assert card.index("Verdict: base + retrieval is as good") < card.index("2 examples of `test.jsonl`")
    assert "16 held-out test examples" in card and "### With `tunesmith compare`" in card


def test_a_sharded_run_that_could_not_score_its_model_says_so_in_the_report(tmp_path):
    """An FSDP2 run whose whole model did not fit on rank 0's device recorded why (results.json
    not_scored) but its report showed the eval-loss table alone, as if nothing were missing."""
    run = fake_run(tmp_path / "run")
    results = json.loads((run / "results.json").read_text())
    results["not_scored"] = "whole, it takes 130.5 GiB, more than 80% of the 60.2 GiB free on cuda:0"
    (run / "results.json").write_text(json.dumps(results))
    page = Path(write_report(run)[0]).read_text()
    assert ("Generated answers not scored here (the model whole did not fit on rank 0's device): whole, it takes "
            "130.5 GiB, more than 80% of the 60.2 GiB free on cuda:0") in page
    assert page.index("not scored here") < page.index("Scored on")
