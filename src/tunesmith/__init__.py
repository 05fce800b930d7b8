"""tunesmith: fine-tune pre-trained language models on your own data."""

__version__ = "0.1.0"


def train(config, overrides=None) -> dict:
    """Fine-tune as configured (a Config, a dict or a YAML path); returns the run's results."""
    from .api import train as _train

    return _train(config, overrides)


def evaluate(model_or_run: str, data: str, **options) -> dict:
    from .api import evaluate as _evaluate

    return _evaluate(model_or_run, data, **options)


__all__ = ["train", "evaluate", "__version__"]
