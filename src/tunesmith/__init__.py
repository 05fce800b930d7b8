"""tunesmith: fine-tune pre-trained language models on your own data."""

import warnings

__version__ = "0.1.0"

# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model:
# a FutureWarning about code the user cannot change, printed on every run.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module="transformers.modeling_utils")


def train(config, overrides=None) -> dict:
    """Fine-tune as configured (a Config, a dict or a YAML path); returns the run's results."""
    from .api import train as _train

    return _train(config, overrides)


def evaluate(model_or_run: str, data: str, **options) -> dict:
    from .api import evaluate as _evaluate

    return _evaluate(model_or_run, data, **options)


# The other commands' functions, imported when first used (`import tunesmith` stays light):
# the same functions the command line calls, with its options as keyword arguments.
LAZY = {
    "check_data": "tunesmith.data.check",  # tunesmith data check
    "plan_for": "tunesmith.plan",  # tunesmith plan
    "compare": "tunesmith.api",  # tunesmith compare
    "evaluate_general": "tunesmith.api",  # tunesmith eval --general
    "choose": "tunesmith.choose",  # tunesmith choose
    "curve": "tunesmith.curve",  # tunesmith curve
    "export": "tunesmith.export",  # tunesmith export
    "push": "tunesmith.export.push",  # tunesmith push
    "make_pairs": "tunesmith.pairs",  # tunesmith pairs
}


def __getattr__(name: str):
    if name not in LAZY:
        raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(LAZY[name]), name)


__all__ = ["train", "evaluate", *LAZY, "__version__"]
