"""Which settings name local paths, and which change what training produces (a resumed run must
keep those); apart from config.py, whose schema they read only through a config's model_dump."""
from __future__ import annotations

from typing import Any

# Keys that do not change the trained weights: a resumed run may differ in these. Of the `eval`
# section only the keys that decide when training stops and which weights it returns count.
RESULT_NEUTRAL = {"output", "train.log_every", "train.device", "train.fast_paths", "train.fsdp_offload",
                  "adapter.offload_activations",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.resume", "train.log_sample_ids",
                  "train.auto_micro_batch"}
EVAL_RESULT_KEYS = {"eval.every_steps", "eval.patience", "eval.min_delta", "eval.restore_best", "eval.best_metric",
                    "eval.best_metric_examples"}


# Settings that name local files or folders (data.mix: its keys). A run's config.yaml holds them
# absolute (start.anchored), a resume accepts the same file named another way (training/checkpoint.py),
# and a model card shows only their last part (export/card.py).
PATH_SETTINGS = ("model.name", "data.train", "data.validation", "data.test", "data.mix", "output.dir")


def with_paths(raw: dict, change) -> dict:
    """A copy of `raw` (a config's model_dump) with change(key, path) in place of each path it names."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for key in PATH_SETTINGS:
        section, name = key.split(".")
        value = out[section][name]
        if isinstance(value, dict):
            out[section][name] = {change(key, source): weight for source, weight in value.items()}
        elif value:
            out[section][name] = change(key, value)
    return out


def result_keys(config) -> dict[str, Any]:
    """Flat 'section.key' -> value of every setting that changes what training produces."""
    flat = {}
    for section, values in config.model_dump(mode="json").items():
        for key, value in values.items():
            name = f"{section}.{key}"
            neutral = section in RESULT_NEUTRAL or name in RESULT_NEUTRAL
            if not neutral and (section != "eval" or name in EVAL_RESULT_KEYS):
                flat[name] = value
    if flat.get("eval.best_metric") == "eval_loss":  # the default: checkpoints from before it existed still match
        del flat["eval.best_metric"], flat["eval.best_metric_examples"]
    return flat
