"""Numbers on the command line, checked as argparse reads them: a negative --limit was a slice that
dropped the last examples, a --batch-size of 0 failed deep in sampling after the model loaded."""
from __future__ import annotations

import argparse
import math


def at_least(low: float, kind=int):
    """An argparse type: a finite `kind` (int or float) of at least `low`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"{text}: expected {'an integer' if kind is int else 'a number'} of at "
                                             f"least {low}")
        return value

    return parse


def share(text: str) -> float:
    """An argparse type: a number above 0 and at most 1."""
    value = at_least(0.0, float)(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share above 0 and at most 1")
    return value


COUNT, SIZE = at_least(0), at_least(1)  # 0 allowed (off, none) / a size of at least one
NUMBER = at_least(0.0, float)
