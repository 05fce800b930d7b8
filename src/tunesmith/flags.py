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


# eval's decoding options a run folder supplies when not given (measure.scored_as)
SCORED_AS_RUN = ("max_new_tokens", "batch_size", "temperature", "seed", "repetition_penalty", "no_repeat_ngram_size")
COUNT, SIZE = at_least(0), at_least(1)  # 0 allowed (off, none) / a size of at least one
NUMBER = at_least(0.0, float)


def add_decoding_options(p, max_new_tokens: int) -> None:
    """How the commands that generate (eval, compare, chat, generate) decode answers."""
    p.add_argument("--max-new-tokens", type=SIZE, default=max_new_tokens)
    p.add_argument("--temperature", type=NUMBER, default=0.0, help="0 = greedy; above 0 samples")
    p.add_argument("--repetition-penalty", type=NUMBER, default=1.0, help="above 1: tokens already said less likely")
    p.add_argument("--no-repeat-ngram-size", type=COUNT, default=0, help="never repeat a token n-gram of this size in "
                                                                       "an answer (4 stops loops; 0 = off)")


def add_prompt_options(p) -> None:
    """What chat and generate put before the user's words."""
    p.add_argument("--system", default=None, help="system prompt (default: the one a run trained with; '' for none)")
    p.add_argument("--tools", default=None, help="JSON file of tools (function schemas, as a record's `tools`) the "
                                                 "chat template renders; the answers' tool calls are said and checked")
