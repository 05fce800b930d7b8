"""Rewards from the user's scorers: `module:function`, called as function(prediction, reference)
like `eval.scorer` (eval/metrics.py load_scorer), weighted and summed.

A scorer returns a number, or a dict of numbers: then its 'reward' or 'score' entry counts, else
the mean of its entries (eval/metrics.py json_example_scores, for instance, gives JSON validity,
all fields right and each field right). Without scorers the reference's own metric is the reward:
the share of JSON fields right where the reference is a JSON object, else ROUGE-L, both of the
answer after its reasoning (as evaluation scores it); the user's scorers get the whole text.
"""
from __future__ import annotations

import math

from ..errors import UserError
from ..eval.metrics import json_example_scores, load_scorer, parse_json_object, rouge_l
from ..eval.scoring import final_answer


def reference_metric(prediction: str, reference: str) -> float:
    """The share of the reference's JSON fields the prediction gets right, or ROUGE-L for text, of
    the answers after their reasoning: a <think> block would otherwise weigh more than the answer."""
    prediction, reference = final_answer(prediction), final_answer(reference)
    if parse_json_object(reference) is not None:
        row = json_example_scores(prediction, reference)
        fields = [v for k, v in row.items() if k.startswith("field/")]
        return sum(fields) / max(1, len(fields))
    return rouge_l(prediction, reference)


def scalar(value, name: str) -> float:
    """A scorer's result as one number."""
    if isinstance(value, dict):
        picked = value.get("reward", value.get("score"))
        numbers = [v for v in value.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if picked is None and value and len(numbers) == len(value):
            picked = sum(numbers) / len(numbers)
        value = value if picked is None else picked  # a None or text among them: said below
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"reward {name}: returned {value!r}; expected a finite number (or a dict of them)")
    return float(value)


class Rewards:
    def __init__(self, specs: list[str], weights: list[float] | None = None):
        if specs:
            if len(set(specs)) < len(specs):
                raise UserError(f"train.rewards: {specs} names a scorer twice; give it a larger weight instead")
            # Each by its function's name, or (where two share one, as `score` often does) by module:function
            short = [spec.rpartition(":")[2] for spec in specs]
            self.scorers = [(name if short.count(name) == 1 else spec, load_scorer(spec))
                            for name, spec in zip(short, specs)]
        else:
            self.scorers = [("reference", reference_metric)]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.scorers)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.scorers]

    def score(self, answers: list[str], references: list[str | None]) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted total per answer, each scorer's values)."""
        each: dict[str, list[float]] = {}
        for name, scorer in self.scorers:
            if scorer is reference_metric and any(r is None for r in references):
                raise UserError("a prompt has no reference, so the reward needs scorers: set train.rewards")
            each[name] = [scalar(scorer(a, r), name) for a, r in zip(answers, references)]
        totals = [sum(w * each[name][i] for w, name in zip(self.weights, self.names)) for i in range(len(answers))]
        return totals, each
