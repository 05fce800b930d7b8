"""tunesmith: fine-tune pre-trained language models on your own data."""

import logging
import warnings

__version__ = "0.1.0"

# bitsandbytes (peft imports it) offers CPUs with AVX-512 bf16 a 4-bit kernel from the hub, and warns
# on every command where the `kernels` package is missing: "Failed to load CPU gemm_4bit_forward".
# Its own 4-bit code runs instead, which only QLoRA uses; `pip install kernels` (hub access) gets it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model:
# a FutureWarning about code the user cannot change, printed on every run.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module="transformers.modeling_utils")


def train(config, overrides=None) -> dict:
    """Fine-tune as configured (a Config, a dict or a YAML path); returns the run's results."""
    from .api import train as _train

    return _train(config, overrides)


def evaluate(model_or_run: str, data: str, **options) -> dict:
    from .measure import evaluate as _evaluate

    return _evaluate(model_or_run, data, **options)


# The other commands' functions, imported when first used (`import tunesmith` stays light):
# the same functions the command line calls, with its options as keyword arguments. Their names
# differ from the submodules' (tunesmith.choose is a module: importing it sets that attribute).
LAZY = {
    "check_data": ("tunesmith.data.check", "check_data"),  # tunesmith data check
    "plan_for": ("tunesmith.plan", "plan_for"),  # tunesmith plan
    "compare": ("tunesmith.measure", "compare"),  # tunesmith compare
    "evaluate_general": ("tunesmith.measure", "evaluate_general"),  # tunesmith eval --general
    "choose_model": ("tunesmith.choose", "choose"),  # tunesmith choose
    "learning_curve": ("tunesmith.curve", "curve"),  # tunesmith curve
    "export_run": ("tunesmith.export", "export"),  # tunesmith export
    "push": ("tunesmith.export.push", "push"),  # tunesmith push
    "make_pairs": ("tunesmith.pairs", "make_pairs"),  # tunesmith pairs
}


def __getattr__(name: str):
    if name not in LAZY:
        raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
    import importlib

    module, function = LAZY[name]
    return getattr(importlib.import_module(module), function)


__all__ = ["train", "evaluate", *LAZY, "__version__"]
