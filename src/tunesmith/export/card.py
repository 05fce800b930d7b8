"""The model card (README.md) of a pushed run: what was trained on which base, how it compares with
that base (the run's own measurements, with their 95% intervals), the data it saw and its config."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..eval.evidence import difference_rows, from_compare, general_rows, metric_rows, model_figures, shown_comparisons
from ..runs import RunFolder, read_json
from ..yamlfile import parse_yaml

# `model: default` is SmolLM2-135M-Instruct, dequantised from the Q4_1 GGUF that models/default.py converts.
DEFAULT_BASE = ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")


def base_model_facts(name: str) -> tuple[str | None, str | None]:
    """(hub id, license) of a run's base model, each None where unknown. A local folder has no hub id
    (the Hub refuses a path as `base_model`); its license is read from its own card where it has one."""
    if name in ("", "default"):
        return DEFAULT_BASE
    path = Path(name).expanduser()
    if path.exists():
        return None, card_license(path / "README.md" if path.is_dir() else path.parent / "README.md")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "README.md")  # no network: a card downloaded before, if any
    return name, card_license(Path(cached)) if isinstance(cached, str) else None


def card_license(readme: Path) -> str | None:
    """The `license:` of a model card's YAML front matter."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    try:
        meta = parse_yaml(text.split("---", 2)[1], unique_keys=False) or {}
    except (yaml.YAMLError, IndexError):
        return None
    found = meta.get("license") if isinstance(meta, dict) else None
    return str(found) if found else None


def model_card(run: RunFolder, what: str, repo_id: str) -> str:
    """README.md for the uploaded `what` ('adapter' or 'merged') of a finished run."""
    config = run.read_config()
    results = run.intact_results() or {}
    hub_id, license_name = base_model_facts(config.model.name)
    meta = {"base_model": hub_id, "library_name": "peft" if what == "adapter" else "transformers",
            "license": license_name, "tags": ["tunesmith"]}
    front = yaml.safe_dump({k: v for k, v in meta.items() if v}, sort_keys=False)
    base = base_text(config.model.name)
    sections = [
        f"# {repo_id.split('/')[-1]}",
        f"{'Adapter' if what == 'adapter' else 'Merged model'} fine-tuned with tunesmith from {base}: method "
        f"`{config.adapter.method}`, objective `{config.train.objective}`.",
        "## Base vs fine-tuned", *comparison_sections(results, read_json(run.comparison) or {}),
        "## Data", *data_sections(results.get("data") or {}),
        "## Training", training_table(results),
        "## Config", "The config the run trained with (local files and folders by their names only):",
        "```yaml\n" + shown_config(config).rstrip() + "\n```",
        "## Use", usage(what, repo_id, hub_id),
    ]
    return f"---\n{front}---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def base_text(name: str) -> str:
    """The base a run trained on, as the card says it: a hub id, the built-in default, a local folder, or
    an earlier run's model (`model: RUN`), named with what that run started from in turn."""
    return origin(name) if base_model_facts(name)[0] else f"{origin(name)}, not on the Hub"


def origin(name: str, seen: frozenset = frozenset()) -> str:
    from ..start import source_run

    if name in ("", "default"):
        return f"`{DEFAULT_BASE[0]}` (tunesmith's built-in default: its Q4_1 GGUF, dequantised)"
    hub_id, _ = base_model_facts(name)
    if hub_id:
        return f"`{hub_id}`"
    earlier = source_run(name)
    if earlier is None or earlier.resolve() in seen:  # runs retrained from each other name each other's merge
        return f"a local model folder (`{local_name(name)}`)"
    started = RunFolder(earlier).read_config().model.name
    return (f"the model of an earlier tunesmith run (`{earlier.name}`, trained from "
            f"{origin(started, seen | {earlier.resolve()})})")


def local_name(spec: str) -> str:
    """A local path by its last part: a public card need not show the folders of the machine it trained on."""
    return Path(spec).name if Path(spec).is_absolute() else spec


def shown_config(config) -> str:
    """The run's config as YAML, local paths by their names (the run's config.yaml holds them absolute)."""
    from ..setting_keys import with_paths

    shown = with_paths(config.model_dump(mode="json"), lambda key, spec: local_name(spec))
    return yaml.safe_dump(shown, sort_keys=False)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    # One table cell whatever the text: a line break would end the row, markup would render
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def comparison_sections(results: dict, comparison: dict) -> list[str]:
    """The run's own baselines table and `tunesmith compare`'s where there are any, else its eval
    losses (no interval), else a plain statement that there is no comparison."""
    tables = shown_comparisons(results, comparison)
    parts = []
    for found in tables:
        later = from_compare(found)
        if len(tables) > 1:
            parts.append(f"### {'With `tunesmith compare`' if later else 'At the end of training'}")
        parts.append(table(*metric_rows(found)))
        parts.append(table(*difference_rows(found)))
        where = (f"{found['examples_scored']} examples of `{found.get('data')}`" if later
                 else f"{(results.get('fine_tuned') or {}).get('test_examples', 'the')} held-out test examples")
        parts.append(f"Scored on {where}; the intervals are paired over the examples (Newcombe's for right/wrong "
                     "scores, else a bootstrap), and "
                     "wins / ties / losses count the examples where the fine-tuned model did better, "
                     "the same or worse." + (f"\n\nVerdict: {found['verdict']}" if found.get("verdict") else ""))
    if tables:
        if eval_losses(results):
            parts.append(f"Validation loss (no interval): {eval_losses(results)}.")
    elif results.get("fine_tuned"):
        base, tuned = results.get("base") or {}, results["fine_tuned"]
        parts.append(f"No per-example comparison with intervals in this run: its {tuned['test_examples']} test "
                     "examples were scored without the base model beside them (eval.compare_base off); its scores "
                     "(the eval loss on the validation split, the rest on the test examples):"
                     if "test_examples" in tuned else
                     "No per-example comparison with intervals in this run (it scored no test split); its "
                     "losses on the validation split:")
        parts.append(table(["metric", "base", "fine-tuned"], [[k, base.get(k), v] for k, v in model_figures(tuned).items()]))
    else:
        parts.append("This run has no base-vs-fine-tuned comparison.")
    return parts + general_sections(results.get("general") or {})


def general_sections(general: dict) -> list[str]:
    """The general-ability probe (`eval.general`), base vs fine-tuned in points of 100."""
    header, rows = general_rows(general)
    if not rows:
        return []
    return ["General ability (points of 100), base vs fine-tuned:",
            table(header, rows),
            *(f"**{w}**" for w in general.get("warnings", []))]


def eval_losses(results: dict) -> str:
    base, tuned = (results.get(k) or {} for k in ("base", "fine_tuned"))
    if "eval_loss" not in tuned:
        return ""
    return (f"base {base['eval_loss']:.4f} -> " if "eval_loss" in base else "") + f"fine-tuned {tuned['eval_loss']:.4f}"


def data_sections(data: dict) -> list[str]:
    """What training recorded of its data (as `tunesmith data check` reports it)."""
    if not data.get("examples"):
        return ["The run recorded no data summary."]
    rows = [[split, count, data.get("tokens", {}).get(split), data.get("label_tokens", {}).get(split)]
            for split, count in data["examples"].items()]
    facts = [("dropped", data.get("dropped") or "none"), ("formats", data.get("formats")),
             ("chat template", data.get("template")), ("truncated", data.get("truncated")),
             ("examples also in train", data.get("overlap_with_train"))]
    return [table(["split", "examples", "tokens", "tokens with a loss"], rows),
            "\n".join(f"- {name}: {listed(value)}" for name, value in facts if value not in (None, {}, ""))]


def listed(value) -> str:
    """{'empty': 2, 'too_long': 1} -> 'empty 2, too_long 1'."""
    return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def training_table(results: dict) -> str:
    keys = ("steps", "train_tokens", "first_loss", "final_loss", "trainable_parameters", "total_parameters",
            "train_seconds", "device", "dtype", "best_step", "early_stopped_at")
    return table(["figure", "value"], [[k, results[k]] for k in keys if results.get(k) is not None])


def usage(what: str, repo_id: str, hub_id: str | None) -> str:
    """How to load what was uploaded (an adapter on a local base needs that base's folder)."""
    if what == "merged":
        lines = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")']
    elif hub_id:
        lines = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                 f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")']
    else:
        lines = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 'base = AutoModelForCausalLM.from_pretrained("path/to/the/base")  # the local base it was trained on',
                 f'model = PeftModel.from_pretrained(base, "{repo_id}")']
    lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")')
    return "```python\n" + "\n".join(lines) + "\n```"
