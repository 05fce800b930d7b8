"""`tunesmith data check`: what tunesmith would do with a data set, before any training.

Format found, counts, token-length percentiles and a histogram picture, examples dropped by
reason with their first line numbers, duplicates, train/eval overlap, total tokens and the
share of tokens that carry a loss. The tokenised data is cached, so a second check (or the
training run after it) starts at once; on a cache hit neither torch nor the tokenizer is loaded.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
from pathlib import Path

from ..config import Config, DataConfig, parse_overrides, validate
from ..errors import UserError
from . import cache
from .lengths import hint_line, length_hint
from .prepare import Prepared, prepare
from .prompts import Prompt
from .sources import check_source
from .validate import drop_lines

PERCENTILES = (50, 90, 95, 99)

# Set while `curve` trains its fractions on files it wrote from the user's: their problems, leakage
# and length hint were said against the user's files and lines, and would name curve's own the second time.
_SAID = contextvars.ContextVar("data_said", default=False)


@contextlib.contextmanager
def said_already():
    """Within it, `data_lines` gives the counts alone."""
    token = _SAID.set(True)
    try:
        yield
    finally:
        _SAID.reset(token)


def check_data(path: str, model: str = "default", out_dir: str | Path = "runs/data-check",
               settings: dict | list[str] | None = None, objective: str | None = None) -> dict:
    """Prepare the data as training would and report on it; writes report.json and lengths.png to out_dir.

    `settings` are data settings, as a dict or as 'key=value' strings (with or without 'data.').
    `objective` (sft, dpo, kto, grpo, ...) reads the data as that objective's training would; without
    it pairs and KTO records are recognised by their fields, and anything else is read as SFT data.
    """
    from ..start import unmerged

    if isinstance(settings, list):
        settings = parse_overrides([s.removeprefix("data.") for s in settings])
    _only_data_settings(settings or {})
    cfg = validate({"data": {**(settings or {}), "train": str(path)}}, "data check").data
    if cfg.train != "demo":  # a missing file, or a training folder holding test/validation splits
        check_source(cfg.train, "data.train")
    kind = data_kind(cfg, objective)
    tokenizer = unmerged(model)[1]  # a run folder (`model: RUN`): the tokenizer it trained with
    try:
        prepared = prepare(cfg, tokenizer) if kind is None else prepare_objective_data(cfg, tokenizer, kind)
    except UserError as err:
        if kind is None or objective is not None:
            raise
        raise UserError(f"{err} (read as {kind} data from the first record's fields; SFT data with such a "
                        "column: data check --objective sft)") from None
    report = build_report(prepared, cfg, str(path), model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["histogram"] = str(write_histogram(prepared, cfg, out / "lengths.png", report["cache_key"]))
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _only_data_settings(settings: dict) -> None:
    """The file is FILE and other sections have no say here: `train.lr=1` (or `train=other.jsonl`) was
    overwritten by FILE without a word."""
    for key, value in settings.items():
        if key == "train" and not isinstance(value, dict):
            raise UserError(f"data check: the data file is the FILE argument, not train={value}")
        if key in Config.model_fields and key != "data":
            raise UserError(f"data check: '{key}.*' is not a data setting; give data settings only, "
                            "e.g. max_seq_len=1024 overlong=truncate")


def data_kind(cfg: DataConfig, objective: str | None = None) -> str | None:
    """Preference pairs, KTO data or GRPO prompts (issue 23); None: SFT data.

    Given no objective, from the first readable record; prompts without answers count as GRPO data
    only when the objective says so (for SFT they are records missing their answers)."""
    from ..objectives import DATA_KIND
    from .formats import PROMPTS, record_kind, rename_columns
    from .sources import is_hub_id, read_records

    if objective is not None:
        return DATA_KIND.get(objective)
    if cfg.train == "demo" or is_hub_id(cfg.train):
        return None
    rows = read_records(cfg.train, cfg.hub_split).rows
    kind = record_kind(rename_columns(rows[0][2], cfg.columns)) if rows else None  # `Chosen`, as training reads it
    return None if kind == PROMPTS else kind


def prepare_objective_data(cfg: DataConfig, model: str, kind: str) -> Prepared:
    """Preference or prompt data prepared as training with that objective would (not cached)."""
    from ..models import load_tokenizer
    from .formats import PROMPTS
    from .preference import prepare_preference
    from .prompts import prepare_prompts

    tokenizer = load_tokenizer(model)
    return prepare_prompts(cfg, tokenizer) if kind == PROMPTS else prepare_preference(cfg, tokenizer, kind)


def build_report(prepared: Prepared, cfg: DataConfig, path: str, model: str) -> dict:
    lengths = sorted(len(e.input_ids) for s in prepared.splits.values() for e in s.encoded)
    tokens = sum(lengths)
    labelled = sum(e.label_count for s in prepared.splits.values() for e in s.encoded)
    drops = prepared.drop_report()
    return {
        "data": path, "model": model, "template": prepared.template, "formats": dict(prepared.formats),
        "records": prepared.records, "examples": {name: len(s) for name, s in prepared.splits.items()},
        "dropped": {k: v for k, v in drops.items() if not k.startswith("duplicate")},
        "duplicates": {k: v for k, v in drops.items() if k.startswith("duplicate")},
        "truncated": prepared.truncated,
        "overlap_with_train": {name: {"count": len(v), "first": v[:3]} for name, v in prepared.overlap.items()},
        "token_lengths": {**{f"p{p}": _percentile(lengths, p) for p in PERCENTILES},
                          "min": lengths[0] if lengths else 0, "max": lengths[-1] if lengths else 0,
                          "max_seq_len": cfg.max_seq_len},
        "tokens": tokens, "label_tokens": labelled, "label_share": labelled / tokens if tokens else 0.0,
        "length_hint": length_hint(prepared, cfg),
        "cached": prepared.cached, "cache_key": prepared.cache_key,
        "near_duplicates": near_duplicates(prepared, cfg),
    }


def data_lines(prepared: Prepared, cfg: DataConfig) -> list[str]:
    """What a command that prepares data says of it: counts, the first problems (the user's file
    and line), and the length hint (`train`, `choose` and `curve` print these)."""
    summary = prepared.summary()
    counts = ", ".join(f"{split} {count}" for split, count in summary["examples"].items())
    dropped = ", ".join(f"{kind} {count}" for kind, count in summary["dropped"].items()) or "none"
    train = prepared.splits.get("train")
    if train and train.encoded and all(isinstance(e, Prompt) for e in train.encoded):
        tokens = f"{summary['tokens']['train']} prompt tokens (the answers are sampled in training)"
    else:
        tokens = f"{summary['tokens']['train']} train tokens ({summary['label_tokens']['train']} with a loss)"
    lines = [f"data: examples {counts}; {tokens}; dropped: {dropped}"]
    if cfg.train == "demo":  # the default: a config that names no data trains on the demo for minutes
        lines[0] += " (the built-in demo task; data.train names your own file)"
    if _SAID.get():
        return lines
    lines += [f"  skipped {problem}" for problem in prepared.problems[:5]]
    if len(prepared.problems) > 5:
        lines.append(f"  and {len(prepared.problems) - 5} more (tunesmith data check lists them by kind)")
    for name, places in prepared.overlap.items():  # leakage: the held-out figures would flatter the model
        if places:
            held = len(prepared.splits[name]) if name in prepared.splits else 0
            lines.append(f"warning: {len(places)} of {held} {name} examples are also in train (first: "
                         f"{', '.join(places[:3])}): their {name} figures measure memory, not what was learned; "
                         "hold them out of data.train (data check lists them)")
    validation = prepared.splits.get("validation")
    if validation is not None and not validation and train:
        # Held out of train before the checks: the drops can take all of it, and the run then goes blind.
        source = (f"data.validation ({cfg.validation})" if cfg.validation else
                  "the held-out share of train (data.validation_share)" + (" after the drops above" if prepared.problems else ""))
        lines.append(f"warning: no validation example is left in {source}: this run has no eval loss, early stopping "
                     "or best-weight selection; give data.validation a file of usable records")
    hint = length_hint(prepared, cfg)
    return lines + ([hint_line(hint)] if hint else [])


def near_duplicates(prepared: Prepared, cfg: DataConfig) -> dict:
    """Near-duplicates left in the prepared data (MinHash/LSH, data.near_dup_threshold): within
    train, and of validation / test examples in train (leakage). Kept beside the data's cache entry
    (its key covers the files and settings), so a check from the cache does not search again: the
    search is most of a cached check's time (9 of 10 s on MedQuAD)."""
    from . import cache
    from .near_dup import report

    key, file_name = prepared.cache_key, f"near-duplicates-{cfg.near_dup_threshold!r}.json"
    stored = cache.entry_file(key, file_name) if key else None
    if stored:
        try:
            return json.loads(stored.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # unreadable: searched again and rewritten
    train = prepared.splits["train"]
    # data.mix's repeats are copies, not near-duplicates: each record's examples once
    first: dict = {}
    for i, (conversation, origin) in enumerate(zip(train.conversations, train.origins)):
        first.setdefault((origin, len(conversation), conversation[-1]["content"]), i)
    distinct = sorted(first.values())
    others = {name: (s.conversations, s.origins) for name, s in prepared.splits.items() if name != "train"}
    found = report([train.conversations[i] for i in distinct], [train.origins[i] for i in distinct], others,
                   cfg.near_dup_threshold)
    if key:
        cache.add_text(key, file_name, json.dumps(found))
    return found


def _percentile(sorted_values: list[int], p: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]


def write_histogram(prepared: Prepared, cfg: DataConfig, target: Path, key: str | None) -> Path:
    """The token-length histogram as a PNG (matplotlib, Agg); reused from the cache when the data is."""
    import shutil

    stored = cache.entry_file(key, "lengths.png") if key else None
    if stored:
        shutil.copyfile(stored, target)
        return target
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, split in prepared.splits.items():
        axes.hist([len(e.input_ids) for e in split.encoded], bins=60, alpha=0.6, label=f"{name} ({len(split)})")
    axes.axvline(cfg.max_seq_len, color="red", linestyle="--", label=f"max_seq_len {cfg.max_seq_len}")
    axes.set_xlabel("tokens per example")
    axes.set_ylabel("examples")
    axes.set_title("Token lengths")
    axes.legend()
    figure.tight_layout()
    figure.savefig(target)
    if key:
        cache.add_file(key, "lengths.png", target)
    return target


def format_report(report: dict) -> str:
    """The report as the lines `tunesmith data check` prints."""
    lines = [f"data: {report['data']}   tokenizer: {report['model']}   chat template: {report['template']}",
             "format: " + ", ".join(f"{k} {v}" for k, v in report["formats"].items()),
             f"records: {report['records']}   examples: " + ", ".join(f"{k} {v}" for k, v in report["examples"].items())]
    if report["examples"].get("validation") == 0 and report["examples"].get("train"):  # as `train` warns of it
        lines.append("warning: no validation example is left after the drops below: a run would have no eval loss, "
                     "early stopping or best-weight selection")
    lengths = report["token_lengths"]
    lines.append("token lengths: " + ", ".join(f"{k} {lengths[k]}" for k in ("min", "p50", "p90", "p95", "p99", "max"))
                 + f" (max_seq_len {lengths['max_seq_len']})")
    lines.append(f"tokens: {report['tokens']}, with a loss: {report['label_tokens']} ({report['label_share']:.1%})")
    for title, key in (("dropped", "dropped"), ("duplicates removed", "duplicates")):
        groups = report[key]
        lines.append(f"{title}:" + (" none" if not groups else ""))
        lines += drop_lines(groups)
    if report["truncated"]:
        lines.append(f"truncated: {report['truncated']}")
    if report.get("length_hint"):
        lines.append(hint_line(report["length_hint"]))
    for name, info in report["overlap_with_train"].items():
        lines.append(f"{name} examples also in train: {info['count']}"
                     + (f" (first: {', '.join(info['first'])})" if info["first"] else ""))
    near = report.get("near_duplicates")
    if near:
        lines.append(f"near-duplicates (estimated Jaccard of word 3-grams >= {near['threshold']:g}; "
                     "data.dedup=near removes them from train):")
        for key, info in near.items():
            if key != "threshold":
                label = "within train" if key == "within_train" else f"{key.removesuffix('_in_train')} examples close to train"
                lines.append(f"  {label}: {info['count']}" + (f" (first: {', '.join(info['first'])})" if info["first"] else ""))
    lines.append(f"histogram: {report['histogram']}" + ("   (from cache)" if report["cached"] else ""))
    return "\n".join(lines)
