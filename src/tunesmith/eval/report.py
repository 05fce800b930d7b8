"""A run's report: report.json (the figures as data) and report.html, one self-contained file
(pictures embedded as base64 PNG, no scripts or links to fetch) that opens offline."""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import yaml

from ..runs import RunFolder, read_json, read_jsonl, write_text
from ..yamlfile import read_yaml
from .evidence import difference_rows, from_compare, general_rows, metric_rows, model_figures, shown_comparisons

EXAMPLES_SHOWN = 8
OBJECTIVE = "objective/"  # the prefix of an objective's statistics in the training records (objectives/base.py)


def collect(run_dir: Path) -> dict:
    """Everything the report shows, from the files of the run folder."""
    run = RunFolder(run_dir).require()
    run.read_config()  # a broken config.yaml is one clear error, naming its line
    records = run.records()
    results = run.intact_results() or {}
    comparison = read_json(run.comparison)
    comparison = comparison if isinstance(comparison, dict) else {}
    examples = read_jsonl(run.comparison_rows)[:EXAMPLES_SHOWN]
    if not examples:
        tuned, base = read_jsonl(run.predictions())[:EXAMPLES_SHOWN], read_jsonl(run.predictions("base"))
        by_prompt = {r["prompt"]: r for r in base}
        for i, row in enumerate(tuned):
            # line by line where both files answer the same prompt there (a test set may ask one prompt
            # twice, with two references), else by prompt
            other = base[i] if i < len(base) and base[i].get("prompt") == row["prompt"] else by_prompt.get(row["prompt"])
            examples.append({"prompt": row["prompt"], "reference": row["reference"],
                             **({"base": {"answer": other["answer"]}} if other else {}),
                             "fine-tuned": {"answer": row["answer"]}})
    keep = ("step", "loss", "mean_loss", "lr", "tokens_per_second", "grad_norm")
    return {
        "run": str(run_dir),
        "config": read_yaml(run.config)[0],
        "data": results.get("data", {}),
        "curves": {
            "train": [{k: v for k, v in r.items() if k in keep or k.startswith(OBJECTIVE)}  # OBJECTIVE: issue 23
                      for r in records if r.get("event") == "train"],
            "eval": training_evals(records),
        },
        "events": [r for r in records if r.get("event") in ("restore_best", "overfitting", "early_stop")],
        "results": {k: v for k, v in results.items() if k not in ("config", "data")},
        "comparison": comparison,
        "examples": examples,
    }


def training_evals(records: list[dict]) -> list[dict]:
    """The evaluations made during training, the latest at each step (a resumed run evaluates a
    step again). The re-evaluation of the best weights once they are put back is left out: the
    loss chart marks the step they came from."""
    by_step: dict = {}
    for r in records:
        if r.get("event") == "restore_best":
            break
        if r.get("event") == "eval":
            by_step[r.get("step")] = {k: v for k, v in r.items()
                                      if k in ("step", "eval_loss", "perplexity") or k.startswith("validation_")}
    return list(by_step.values())


def figures(report: dict) -> dict[str, str]:
    """Name -> base64 PNG of each plot that has data."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train, evals = report["curves"]["train"], report["curves"]["eval"]
    plots = {}
    panels = [
        ("loss", "loss", [train_loss(train), ("eval loss", evals, "eval_loss")]),
        # eval.best_metric: the validation answers' metric that chose the kept weights
        *[(key, key.replace("_", " ", 1), [(key.replace("_", " ", 1), evals, key)])
          for key in dict.fromkeys(k for r in evals for k in r if k.startswith("validation_"))],
        ("learning_rate", "learning rate", [("lr", train, "lr")]),
        ("tokens_per_second", "tokens / s", [("tokens/s", train, "tokens_per_second")]),
        *objective_panels(train),
    ]
    for name, ylabel, series in panels:
        drawn = [(label, rows, key) for label, rows, key in series if any(key in r for r in rows)]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        for label, rows, key in drawn:
            points = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
            steps, values = zip(*points)
            if label.startswith("train loss") and len(points) >= SMOOTH_FROM:  # a step's loss is noisy: show the trend
                line, = ax.plot(steps, values, alpha=0.3, label=label)
                ax.plot(steps, smoothed(values), color=line.get_color(), label=f"{label} (smoothed)")
            else:
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
        if name == "loss" or name.startswith("validation_"):
            for step, style, label in loss_markers(report["events"]):
                ax.axvline(step, color="grey", linestyle=style, linewidth=1, label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(drawn) > 1 or ax.get_lines()[len(drawn):]:
            ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        plots[name] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return plots


def loss_markers(events: list[dict]) -> list[tuple[int, str, str]]:
    """(step, line style, label) of the loss chart's markers: the weights kept, where training stopped early."""
    marks = []
    for e in events:
        if e.get("event") == "restore_best":
            what = "eval loss" if e.get("metric", "eval_loss") == "eval_loss" else e["metric"]
            marks.append((e["best_step"], "--", f"best {what}, weights kept (step {e['best_step']})"))
        elif e.get("event") == "early_stop":
            marks.append((e["step"], ":", f"early stop (step {e['step']})"))
    return marks


def train_loss(train: list[dict]) -> tuple:
    """The train-loss series: each logging interval's mean where the run logged one (a single
    step's loss, logged every few steps, jumps about), else each logged step's loss."""
    if any("mean_loss" in r for r in train):
        rows = [{"step": r["step"], "mean_loss": r.get("mean_loss", r.get("loss"))} for r in train]
        return "train loss (mean since the last point)", rows, "mean_loss"
    return "train loss", train, "loss"


SMOOTH_FROM = 20  # train-loss points from which the report draws the smoothed curve beside the raw one


def smoothed(values, weight: float = 0.8) -> list[float]:
    """Exponential moving average, debiased (TensorBoard's smoothing): the first points are not
    pulled towards 0, and each point weighs only steps up to it."""
    out, average, n = [], 0.0, 0
    for value in values:
        if math.isfinite(value):  # a skipped step's NaN loss would make every later point NaN
            n += 1
            average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** n) if n else math.nan)
    return out


def objective_panels(train: list[dict]) -> list[tuple]:
    """Panels of an objective's statistics (train.objective other than sft), grouped by their first
    name part: implicit rewards together, each scorer's mean reward together, the KL alone, ..."""
    keys = list(dict.fromkeys(k for r in train for k in r if k.startswith(OBJECTIVE) and not k.endswith("/std")))
    groups: dict[str, list] = {}
    for key in keys:
        groups.setdefault(key[len(OBJECTIVE):].split("/")[0], []).append((key[len(OBJECTIVE):], train, key))
    return [(f"objective_{name}", f"objective: {name}", series) for name, series in groups.items()]


def _fmt(value) -> str:
    """Scores to 4 decimals; seconds, rates and counts (100 and more) to 1 decimal or whole, grouped."""
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else html.escape(str(value))


def _warnings(lines: list[str]) -> str:
    return "".join(f"<p><b>{html.escape(line)}</b></p>" for line in lines)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def comparison_html(report: dict) -> str:
    """The run's own baselines table (base, k-shot, retrieval, fine-tuned) and `tunesmith compare`'s
    where there are any, else base against fine-tuned; then the general-ability probe."""
    results = report["results"]
    tables = shown_comparisons(results, report["comparison"])
    parts = []
    if results.get("not_scored"):  # a sharded (FSDP2) run whose whole model did not fit on rank 0's device
        parts.append(f"<p><b>Generated answers not scored here (the model whole did not fit on rank 0's device): "
                     f"{html.escape(results['not_scored'])}. Score the trained weights with <code>tunesmith eval</code> "
                     "where it fits.</b></p>")
    for comparison in tables:
        later = from_compare(comparison)
        if len(tables) > 1:
            parts.append(f"<h3>{'tunesmith compare' if later else 'At the end of training'}</h3>")
        if comparison.get("verdict"):
            parts.append(f"<p><b>Verdict:</b> {html.escape(comparison['verdict'])}</p>")
        parts.append(_warnings(comparison.get("warnings", [])))
        parts.append(_table(*metric_rows(comparison)))
        parts.append(_table(*difference_rows(comparison)))
        where = (f"{comparison['examples_scored']} examples from {html.escape(str(comparison.get('data')))}"
                 if later else "the test split")
        parts.append(f"<p>Scored on {where}; paired 95% intervals over examples (Newcombe's for right/wrong "
                     "scores, else a bootstrap).</p>")
    if not tables and results.get("fine_tuned"):
        base, tuned = results.get("base", {}), model_figures(results["fine_tuned"])
        parts.append(_table(["metric", "base", "fine-tuned"], [[k, base.get(k, "-"), v] for k, v in tuned.items()]))
    parts.append(general_html(results.get("general")))
    return "".join(parts) or "<p>No comparison in this run folder (run <code>tunesmith compare</code>).</p>"


def general_html(general: dict | None) -> str:
    """The general-ability probe, base against fine-tuned, in points of 100."""
    if not general:
        return ""
    header, rows = general_rows(general)
    return "<h3>General ability kept?</h3>" + _table(header, rows) + _warnings(general.get("warnings", []))


def examples_html(report: dict) -> str:
    blocks = []
    for example in report["examples"]:
        answers = "".join(f"<div class='answer'><b>{html.escape(name)}</b><pre>{html.escape(value['answer'])}</pre></div>"
                          for name, value in example.items() if isinstance(value, dict) and "answer" in value)
        blocks.append(f"<div class='example'><p><b>prompt</b></p><pre>{html.escape(example['prompt'])}</pre>"
                      f"<p><b>reference</b></p><pre>{html.escape(example['reference'])}</pre>"
                      f"<div class='answers'>{answers}</div></div>")
    return "".join(blocks) or "<p>No generated answers in this run folder.</p>"


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
pre{white-space:pre-wrap;background:#f6f6f6;padding:6px;margin:2px 0}img{max-width:100%}
.answers{display:flex;gap:8px}.answer{flex:1}.example{border-top:2px solid #ddd;margin-top:1em}"""


# The report is opened from disk and shared: it runs no script and loads nothing, whatever its text holds.
NO_SCRIPTS = ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
              "style-src 'unsafe-inline'\">")


def render_html(report: dict, plots: dict[str, str]) -> str:
    results = report["results"]
    # Plot names come from metrics.jsonl's keys: a run folder from elsewhere may hold any text there.
    images = "".join(f"<figure><img alt='{html.escape(name, quote=True)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(name.replace('_', ' '))}</figcaption></figure>"
                     for name, data in plots.items())
    facts = [[k, results[k]] for k in ("steps", "train_tokens", "train_seconds", "tokens_per_second", "first_loss",
                                       "final_loss", "trainable_parameters", "total_parameters", "dtype")
             if results.get(k) is not None]
    events = _table(["event", "step", "details"], [[e.get("event"), e.get("step"), json.dumps(
        {k: v for k, v in e.items() if k not in ("event", "step", "time")})] for e in report["events"]]) if report["events"] else ""
    data = report["data"]
    data_rows = [[name, count, data.get("tokens", {}).get(name, "-"), data.get("label_tokens", {}).get(name, "-")]
                 for name, count in data.get("examples", {}).items()]
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8">{NO_SCRIPTS}<title>tunesmith report: {html.escape(report['run'])}</title>
<style>{STYLE}</style></head><body>
<h1>tunesmith run report</h1><p>{html.escape(report['run'])}</p>
<h2>Training</h2>{images or '<p>No metrics recorded.</p>'}{_table(['figure', 'value'], facts)}{events}
<h2>Comparison</h2>{comparison_html(report)}
<h2>Data</h2>{_table(['split', 'examples', 'tokens', 'label tokens'], data_rows)}
<p>dropped: {html.escape(json.dumps(data['dropped']) if data.get('dropped') else 'none')}</p>
<h2>Examples</h2>{examples_html(report)}
<h2>Config</h2><pre>{html.escape(yaml.safe_dump(report['config'], sort_keys=False))}</pre>
</body></html>"""


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.json and report.html into the run folder; returns their paths."""
    run_dir = Path(run_dir)
    report = collect(run_dir)
    plots = figures(report)
    json_path, html_path = run_dir / "report.json", run_dir / "report.html"
    write_text(json_path, json.dumps(report, indent=2, default=str))
    write_text(html_path, render_html(report, plots))
    return html_path, json_path
