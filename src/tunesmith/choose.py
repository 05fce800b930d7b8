"""`tunesmith choose`: which base model to start from, measured on the user's own data.

For each candidate (a local folder, a .gguf file, a hub id, 'default'): the plan's memory and
time for the configured run on the chosen device; where it fits, the answer loss and generation
metrics on the validation examples zero-shot and with retrieved training examples; with a token
budget, a short fine-tune of that many training tokens each and the same metrics after it. The
candidates are ranked, each against the next with a paired interval, in one table
(choose.json) and one plot (choose.png). Candidates that do not fit are listed as such, not loaded.

The answer loss is compared per character of the reference answer (nats per character), not per
token: candidates with different tokenizers cut the same answer into different numbers of tokens.
"""
from __future__ import annotations

import gc
import json
import math
import re
from pathlib import Path

from .config import Config, load_config
from .errors import UserError
from .eval.compare import LOSS, LOWER_IS_BETTER, PER_CHAR, Scored, Settings, compare_scored
from .plan import duration
from .plan.shapes import ALIASES
from .progress import say

SETTINGS = ("zero-shot", "retrieval", "fine-tuned")


def choose(config: str | None, models: list[str], overrides: list[str] | None = None, budget_tokens: int | None = None,
           device: str | None = None, memory_gib: float | None = None, limit: int | None = None,
           retrieval_k: int = 3, rank_by: str = PER_CHAR, out: str = "runs/choose", samples: int = 2000) -> dict:
    """Plan, score and rank the candidates; writes choose.json and choose.png into `out`."""
    if len(models) < 1:
        raise UserError("choose: name the candidates with --models A,B,...")
    if limit is not None and limit < 1:
        raise UserError(f"choose: --limit {limit}: score at least one validation example")
    repeated = sorted({spec for spec in models if models.count(spec) > 1})
    if repeated:  # scored twice, the same figures ranked against themselves
        raise UserError(f"choose: each candidate once; {', '.join(repeated)} is named twice in --models")
    cfg = load_config(config, overrides)
    sft_only(cfg, "choose")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    # Every candidate planned before any is loaded: a wrong name fails now, not after minutes of scoring.
    candidates = [{"model": spec, **_plan(cfg, spec, device, memory_gib)} for spec in models]
    for entry in candidates:  # a shape alone is planned (and listed where it does not fit), never scored
        if entry["fits"] and entry["model"].lower() in ALIASES:
            raise UserError(f"choose: {entry['model']} is a shape `plan` ships, not a model to score; name the model "
                            f"itself ({ALIASES[entry['model'].lower()]}, or a local folder of it)")
    target = device or (f"{memory_gib:g} GiB" if memory_gib else "this machine")
    for number, entry in enumerate(candidates, 1):
        fits = ("tight (over the 90% of memory a run keeps to), scored" if entry["tight"]
                else "fits" if entry["fits"] else "does not fit; not loaded")
        say(f"candidate {number}/{len(candidates)}: {entry['model']}: planned {entry['planned_memory'] / 2**30:.1f} "
            f"GiB of {entry['device_memory'] / 2**30:.1f} GiB on {entry['device_name']}: {fits}")
    shared: dict = {}
    facts = {"config": config, "budget_tokens": budget_tokens, "retrieval_k": retrieval_k, "device": target}
    result = write_ranking(candidates, folder, rank_by, samples, cfg.eval.seed, 0, facts)  # the plans alone
    for number, entry in enumerate(candidates, 1):
        if not entry["fits"]:
            continue
        say(f"candidate {number}/{len(candidates)}: {entry['model']}")
        if not shared:  # the same examples for every candidate: read once, with the first candidate's tokenizer
            shared.update(_read_data(cfg, entry["model"], limit))
            check_rank_by(rank_by, shared["validation"], cfg.eval.scorer)
        entry["scored"] = _score_candidate(cfg, entry["model"], shared, budget_tokens, retrieval_k,
                                           folder / f"{number:02d}-{folder_name(entry['model'])}")
        # The epoch's time from the training tokens as the first candidate's tokenizer counts them.
        entry["epoch_seconds"] = _plan(cfg, entry["model"], device, memory_gib, shared["train_tokens"])["epoch_seconds"]
        # Written after each candidate: a failure later (memory, a stop) keeps what was measured.
        result = write_ranking(candidates, folder, rank_by, samples, cfg.eval.seed, len(shared["validation"]), facts)
    result["plot"] = str(plot(result, folder / "choose.png"))
    return result


def write_ranking(candidates: list[dict], folder: Path, rank_by: str, samples: int, seed: int, examples: int,
                  facts: dict) -> dict:
    """choose.json as far as the candidates have been scored."""
    result = {**rank(candidates, rank_by, samples, seed), **facts, "examples": examples,
              "scored": f"{sum('scored' in c for c in candidates)} of {sum(c['fits'] for c in candidates)}"}
    (folder / "choose.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def _plan(cfg: Config, spec: str, device: str | None, memory_gib: float | None, tokens: int | None = None) -> dict:
    """Will the configured run fit this candidate on the device, and how long would an epoch of
    `tokens` training tokens take there (None on a memory size alone)?"""
    from .plan import plan, setup_from_config, shape_of

    found = plan(shape_of(spec, cfg.model.trust_remote_code), setup_from_config(cfg), device or (None if memory_gib else "this-machine"), memory_gib, tokens)
    target = found.target
    # A tight candidate is scored: loading it for scoring needs less than its planned training peak.
    return {"fits": target.fits or target.tight, "tight": target.tight, "planned_memory": target.estimate.total,
            "device_memory": target.device.memory,
            "device_name": target.device.name, "epoch_seconds": target.epoch_seconds}


def sft_only(cfg: Config, command: str) -> None:
    """curve and choose read the data as SFT examples and score answers to them."""
    if cfg.train.objective != "sft":
        raise UserError(f"{command}: takes SFT runs (question/answer or chat data); this config trains "
                        f"train.objective={cfg.train.objective}. Run it on SFT data of the same task "
                        "(the prompts with their chosen answers, for example)")


def _read_data(cfg: Config, spec: str, limit: int | None) -> dict:
    """The validation examples every candidate is scored on, and the training data retrieval draws from."""
    from .data.check import data_lines
    from .data.prepare import prepare
    from .models import load_tokenizer
    from .start import unmerged

    data = prepare(cfg.data, load_tokenizer(unmerged(spec)[1], cfg.model.trust_remote_code))
    for line in data_lines(data, cfg.data):
        say(line)
    validation = data.splits.get("validation") or data.splits["train"]
    return {"validation": validation.conversations[:limit] if limit else validation.conversations,
            "train": data.splits["train"].conversations, "train_tokens": data.splits["train"].tokens,
            "tokens_per_example": data.splits["train"].tokens / max(1, len(data.splits["train"]))}


def check_rank_by(metric: str, validation: list[list[dict]], scorer: str | None) -> None:
    """Refuse a --rank-by the validation examples cannot give before any candidate is scored: the
    metrics are those of the references scored against themselves, and the answer losses. A user
    scorer may add any name."""
    from .data.formats import is_raw_text
    from .eval.scoring import conversation_scores

    if scorer:
        return
    known = {LOSS, PER_CHAR}
    if not is_raw_text(validation):
        known |= {k for row in conversation_scores([c[-1]["content"] for c in validation], validation) for k in row}
    if metric not in known:
        raise UserError(f"choose: --rank-by {metric} is not a metric of these examples; choose from "
                        f"{', '.join(sorted(known))}")


def folder_name(spec: str) -> str:
    """A candidate as a folder name: all of it, so org1/model and org2/model stay apart."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("._") or "model"


def _score_candidate(cfg: Config, spec: str, shared: dict, budget_tokens: int | None, retrieval_k: int,
                     run: Path) -> dict:
    """{setting: Scored} for one candidate: zero-shot and with retrieval, then after a short fine-tune
    into `run`."""
    from .device import compute_dtype, resolve
    from .eval.baselines import prompt_sets, score_rows
    from .models import load_model, load_tokenizer
    from .start import starting_model

    device = resolve(cfg.train.device)
    folder = starting_model(spec)  # a run folder: its adapter merged, as a run started from it trains on
    tokenizer = load_tokenizer(folder, cfg.model.trust_remote_code)
    settings = Settings.of(cfg.eval, cfg.data.max_seq_len)
    model = load_model(folder, compute_dtype(cfg.model.dtype, device), cfg.model.trust_remote_code, device)
    sets = prompt_sets("zero-shot", shared["validation"], shared["train"], 0, retrieval_k, cfg.eval.seed)
    rows = score_rows(model, tokenizer, dict(zip(SETTINGS, sets.values())), settings)
    del model
    gc.collect()
    if budget_tokens:
        from .runs import load_trained

        _short_fine_tune(cfg, spec, budget_tokens, shared["tokens_per_example"], run)
        tuned, tuned_tokenizer, _ = load_trained(str(run), device=device)
        rows += score_rows(tuned, tuned_tokenizer, {"fine-tuned": shared["validation"]}, settings)
        del tuned
        gc.collect()
    for row in rows:
        add_loss_per_char(row)
    return {row.name: row for row in rows}


def _short_fine_tune(cfg: Config, spec: str, budget_tokens: int, tokens_per_example: float, run: Path) -> Path:
    """The configured run on this candidate for about `budget_tokens` training tokens, into `run`."""
    from .api import train

    per_step = cfg.train.batch_size * cfg.train.grad_accum * max(1.0, tokens_per_example)
    steps = max(1, math.ceil(budget_tokens / per_step))
    raw = cfg.model_dump(mode="json")
    raw["model"]["name"] = spec
    raw["train"].update(max_steps=steps, resume=False)
    raw["eval"].update(generate=False, report=False, general=False)
    raw["output"].update(dir=str(run), overwrite=True)
    train(raw)
    return run


def add_loss_per_char(row: Scored) -> None:
    """Nats per character of the reference answer: the answer's summed loss over its length in characters."""
    for example, tokens, reference in zip(row.rows, row.tokens, row.references):
        example[PER_CHAR] = example[LOSS] * tokens / max(1, len(reference))


def rank_key(entry: dict, metric: str) -> float:
    row = best_setting(entry)
    value = row.means()[metric]
    return value if metric in LOWER_IS_BETTER else -value


def best_setting(entry: dict) -> Scored:
    """The setting a candidate is ranked by: after fine-tuning where there was one, else with retrieval, else zero-shot."""
    scored = entry["scored"]
    return next(scored[s] for s in reversed(SETTINGS) if s in scored)


def rank(candidates: list[dict], metric: str, samples: int, seed: int) -> dict:
    """Fitting candidates best first by `metric`, each with its paired interval against the next one."""
    loaded = [c for c in candidates if c.get("scored")]
    for c in loaded:
        if metric not in best_setting(c).means():
            raise UserError(f"choose: --rank-by {metric} is not a metric here; "
                            f"choose from {', '.join(best_setting(c).means())}")
    loaded.sort(key=lambda c: rank_key(c, metric))
    table = []
    for place, c in enumerate(loaded, 1):
        row = {"rank": place, "model": c["model"],
               **{k: c[k] for k in ("planned_memory", "device_memory", "fits", "epoch_seconds")},
               "settings": {name: scored.means() for name, scored in c["scored"].items()}, "ranked_by": metric,
               "intervals": {name: scored.interval(metric, samples, seed)  # where the setting has it
                             for name, scored in c["scored"].items() if metric in scored.means()}}
        if place < len(loaded):
            following = best_setting(loaded[place])
            found = [d for d in compare_scored(following, best_setting(c), samples, seed) if d["metric"] == metric]
            row["versus_next"] = {**found[0], "next": loaded[place]["model"]} if found else None
        table.append(row)
    unfit = [{"model": c["model"], "fits": False, "planned_memory": c["planned_memory"],
              "device_memory": c["device_memory"], "device_name": c["device_name"]} for c in candidates if not c["fits"]]
    return {"ranking": table, "not_fitting": unfit}


def format_choice(result: dict) -> str:
    metric = result["ranking"][0]["ranked_by"] if result["ranking"] else PER_CHAR
    lines = [f"candidates ranked by {metric} ({'after a short fine-tune' if result['budget_tokens'] else 'with retrieval'}"
             f", {result['examples']} validation examples; planned memory on {result['device']})"]
    for row in result["ranking"]:
        cells = "  ".join(f"{name}: {means.get(metric, float('nan')):.4f}" for name, means in row["settings"].items())
        epoch = f", epoch {duration(row['epoch_seconds'])}" if row.get("epoch_seconds") else ""
        lines.append(f"{row['rank']}. {row['model']}  [{row['planned_memory'] / 2**30:.1f} GiB{epoch}]  {cells}")
        versus = row.get("versus_next")
        if versus:
            lines.append(f"     vs {versus['next']}: {versus['difference']:+.4f} [{versus['low']:+.4f}, "
                         f"{versus['high']:+.4f}]  win/tie/loss {versus['win']}/{versus['tie']}/{versus['loss']}")
    for c in result["not_fitting"]:
        lines.append(f"-  {c['model']}: does not fit ({c['planned_memory'] / 2**30:.1f} GiB planned, "
                     f"{c['device_memory'] / 2**30:.1f} GiB on {c['device_name']}); not loaded")
    lines.append(f"plot: {result.get('plot')}")
    return "\n".join(lines)


def plot(result: dict, target: Path) -> Path:
    """Each candidate's ranking metric per setting, with a 95% interval of the mean (Wilson's for a share right, else a bootstrap)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    ranking = result["ranking"]
    metric = ranking[0]["ranked_by"] if ranking else PER_CHAR
    width = 0.8 / len(SETTINGS)
    for s, setting in enumerate(SETTINGS):
        points = [(i, row["intervals"][setting]) for i, row in enumerate(ranking) if setting in row.get("intervals", {})]
        if points:
            xs = [i + (s - 1) * width for i, _ in points]
            means = [p["mean"] for _, p in points]
            errors = [[p["mean"] - p["low"] for _, p in points], [p["high"] - p["mean"] for _, p in points]]
            axes.bar(xs, means, width, yerr=errors, capsize=3, label=setting)
    axes.set_xticks(range(len(ranking)), [row["model"][-30:] for row in ranking])
    axes.set_ylabel(metric)
    axes.set_title("Candidates, best first (95% intervals)")
    if ranking:
        axes.legend()
    figure.tight_layout()
    figure.savefig(target)
    return target
