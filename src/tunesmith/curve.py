"""`tunesmith curve`: does more data still help?

The configured run is trained on nested, seeded fractions of the training data (one shuffled
order; each fraction takes its first share, so the 25% set lies inside the 50% set) at equal
steps per example: the same epochs, or `train.max_steps` scaled by the fraction. Every run is
scored on the same held-out examples (the test split where there is one, else validation, held
out once before any fraction is taken), and the curve shows the held-out metric with its 95%
interval per fraction, and each step's change with a paired interval. A change whose interval
excludes zero says the added data still helped.
"""
from __future__ import annotations

import gc
import json
import random
from pathlib import Path


from .config import load_config
from .errors import UserError
from .eval.compare import LOSS, LOWER_IS_BETTER, Scored, Settings, compare_scored
from .progress import say


def parse_fractions(text: str) -> list[float]:
    """`--fractions 0.25,0.5,1` as numbers."""
    try:
        return check_fractions([float(f) for f in text.split(",") if f.strip()])
    except ValueError:
        raise UserError(f"--fractions {text}: expected numbers separated by commas, e.g. 0.25,0.5,1") from None


def check_fractions(fractions: list[float]) -> list[float]:
    """Shares in (0, 1], each once (two equal shares would train into one folder), before any data is read."""
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise UserError(f"curve: fractions must lie in (0, 1], got {fractions}")
    if len(set(fractions)) < len(fractions):
        raise UserError(f"curve: each fraction once, got {fractions}")
    return fractions


def nested_fractions(n: int, fractions: list[float], seed: int) -> list[list[int]]:
    """Indices of each fraction's examples (ascending fractions): prefixes of one seeded order."""
    check_fractions(fractions)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[:max(1, round(f * n))]) for f in sorted(fractions)]


def _splits(cfg) -> tuple[list, list, list | None]:
    """(train, validation, test) conversations that training keeps.

    The data pipeline reads and checks the user's files once: broken lines, duplicates and
    over-long examples are reported against the user's file and line, and each fraction is a share
    of the usable examples, so the fractions' own runs have nothing left to drop. Validation is held
    out of train (seeded) where no file is given; mixed sources count once each.
    """
    from .data.check import data_lines
    from .data.prepare import prepare
    from .models import load_tokenizer
    from .start import unmerged

    data = prepare(cfg.data, load_tokenizer(unmerged(cfg.model.name)[1], cfg.model.trust_remote_code))
    for line in data_lines(data, cfg.data):
        say(line)
    if any(c[0]["role"] == "text" for c in data.splits["train"].conversations):
        raise UserError("curve: takes question/answer or chat examples, not raw text yet; for raw text, train on "
                        "shares of your documents and compare the runs with `tunesmith eval RUN --data held_out.jsonl`, "
                        "which gives the held-out text's loss")

    def whole(name):  # one conversation per record: its examples (one per answer, or copies) share an origin
        split = data.splits.get(name)
        if split is None:
            return None
        by_origin: dict = {}
        for origin, conversation in zip(split.origins, split.conversations):
            if len(conversation) >= len(by_origin.get(origin, ())):
                by_origin[origin] = conversation
        return list(by_origin.values())

    return whole("train"), whole("validation"), whole("test")


def _write(path: Path, conversations: list) -> str:
    """Conversations as `messages` records, with their declared tools beside them, as a user writes them."""
    from .data.tools import split_tools

    with open(path, "w", encoding="utf-8") as handle:
        for conversation in conversations:
            tools, messages = split_tools(conversation)
            handle.write(json.dumps({"messages": messages, **({"tools": tools} if tools else {})}) + "\n")
    return str(path)


def curve(config: str, fractions: list[float], overrides: list[str] | None = None, out: str = "runs/curve",
          seed: int = 0, samples: int = 2000) -> dict:
    """Train on each fraction, score each on the held-out examples; writes curve.json and curve.png."""
    from .api import train as train_run
    from .choose import sft_only
    from .data.check import said_already

    cfg = load_config(config, overrides)
    sft_only(cfg, "curve")
    check_fractions(fractions)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    train, validation, test = _splits(cfg)
    held_out = test[:cfg.eval.test_limit] if test and cfg.eval.test_limit else test or validation
    subsets = nested_fractions(len(train), fractions, seed)
    files = {"validation": _write(folder / "validation.jsonl", validation)}
    if test:
        files["test"] = _write(folder / "test.jsonl", test)
    points, previous = [], None
    for number, (fraction, subset) in enumerate(zip(sorted(fractions), subsets), 1):
        say(f"fraction {number}/{len(subsets)}: {fraction:.0%} of the training data ({len(subset)} examples)")
        run = folder / f"fraction-{fraction:g}"
        raw = cfg.model_dump(mode="json")
        # The subsets hold chat messages, read as such whatever the user's files were.
        raw["data"].update(train=_write(folder / f"train-{fraction:g}.jsonl", [train[i] for i in subset]), mix={},
                           validation=files["validation"], test=files.get("test"), format="messages", columns={})
        if cfg.train.max_steps:  # equal steps per example: steps scale with the data
            raw["train"]["max_steps"] = max(1, round(cfg.train.max_steps * len(subset) / len(train)))
        raw["train"]["resume"] = False
        raw["eval"].update(kshot=0, retrieval_k=0, general=False, report=False, generate=False)
        raw["output"].update(dir=str(run), overwrite=True)
        with said_already():  # the user's files' problems were said by _splits, with their lines
            results = train_run(raw)
        scored = _score(run, held_out, cfg, generate=bool(test) and cfg.eval.generate)
        # trained: those left after the data policy's drops (overlong, empty), which the x axis shows
        point = {"fraction": fraction, "examples": len(subset), "trained": results["data"]["examples"]["train"],
                 "steps": results["steps"], "run": str(run), "means": scored.means(),
                 "intervals": {m: scored.interval(m, samples, seed) for m in scored.means()}}
        if previous is not None:
            point["change"] = compare_scored(previous, scored, samples, seed)
        points.append(point)
        previous = scored
        result = {"config": config, "seed": seed, "held_out": "test" if test else "validation",
                  "held_out_examples": len(held_out), "metric": _metric(points[-1]["means"]), "points": points,
                  "fractions_done": f"{number} of {len(subsets)}"}
        # Written after each fraction: a failure in a later one keeps the points measured.
        (folder / "curve.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    result["plot"] = str(plot(result, folder / "curve.png"))
    return result


def _score(run: Path, conversations: list, cfg, generate: bool) -> Scored:
    """Held-out answer loss per example (and generation metrics where the test split is scored)."""
    from .eval.compare import answer_losses, score_prompts
    from .runs import load_trained

    model, tokenizer, _ = load_trained(str(run))
    try:
        if generate:
            return score_prompts(model, tokenizer, run.name, conversations, Settings.of(cfg.eval))
        losses, counts = answer_losses(model, tokenizer, conversations, batch_size=cfg.eval.batch_size)
        return Scored(run.name, [""] * len(losses), [{LOSS: v} for v in losses], counts)
    finally:
        del model
        gc.collect()


def _metric(means: dict) -> str:
    from .eval.baselines import primary_metric

    return primary_metric(means)


def format_curve(result: dict) -> str:
    metric = result["metric"]
    lines = [f"held-out {metric} on {result['held_out_examples']} {result['held_out']} examples "
             f"({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)"]
    for point in result["points"]:
        i = point["intervals"][metric]
        dropped = f", {point['trained']} trained" if point.get("trained", point["examples"]) != point["examples"] else ""
        line = (f"  {point['fraction']:>5.0%} ({point['examples']} examples{dropped}, {point['steps']} steps): "
                f"{i['mean']:.4f} [{i['low']:.4f}, {i['high']:.4f}]")
        change = next((d for d in point.get("change", []) if d["metric"] == metric), None)
        if change:
            line += f"   change {change['difference']:+.4f} [{change['low']:+.4f}, {change['high']:+.4f}]"
        lines.append(line)
    lines.append(f"plot: {result.get('plot')}")
    return "\n".join(lines)


def plot(result: dict, target: Path) -> Path:
    """The held-out metric against the number of training examples, with 95% intervals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = result["metric"]
    figure = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    xs = [p.get("trained", p["examples"]) for p in result["points"]]
    means = [p["intervals"][metric]["mean"] for p in result["points"]]
    errors = [[m - p["intervals"][metric]["low"] for m, p in zip(means, result["points"])],
              [p["intervals"][metric]["high"] - m for m, p in zip(means, result["points"])]]
    axes.errorbar(xs, means, yerr=errors, marker="o", capsize=4)
    axes.set_xlabel("training examples trained on")
    axes.set_ylabel(f"held-out {metric}")
    axes.set_title("Does more data still help? (95% intervals)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(target)
    return target
