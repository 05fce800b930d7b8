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


__all__ = ["train", "evaluate", "__version__"]
