"""Which weights are best: the eval loss, or a metric of answers generated during training.

With `eval.best_metric` other than `eval_loss`, each evaluation during training also generates
answers for the first `eval.best_metric_examples` validation examples and scores them as the
test split is scored; early stopping and the weights kept then follow that metric. The eval loss
can keep falling while the answers stop getting better (bench/RESULTS.md, MedQuAD), and for a
task such as the demo's JSON what counts is whether every field is right.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .compare import LOWER_IS_BETTER
from .decoding import LoopGuard
from .generate import generate_answers
from .scoring import score

EVAL_LOSS = "eval_loss"


class Selection:
    """Scores the model's validation answers by one metric; `key` turns a value into the number
    early stopping and the kept weights minimise (the metric itself, or minus it where higher is better)."""

    def __init__(self, model, tokenizer, validation, eval_cfg):
        self.model, self.tokenizer, self.cfg = model, tokenizer, eval_cfg
        self.metric = eval_cfg.best_metric
        self.lower_is_better = self.metric in LOWER_IS_BETTER  # repetition; the rest: higher is better
        self.conversations = validation.conversations[: eval_cfg.best_metric_examples]

    def key(self, value: float) -> float:
        return value if self.lower_is_better else -value

    def value(self, key: float) -> float:
        return self.key(key)  # the same sign change undoes itself

    def __call__(self, label: str) -> float:
        """The metric over the validation answers. The adapter is not merged for it (unmerging
        would not give the training weights back bit for bit) and the RNG is left as it was, so
        training goes on exactly as it would have without the evaluation."""
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        was_training = self.model.training
        with torch.random.fork_rng(devices=devices):
            answers, _ = generate_answers(self.model, self.tokenizer, self.conversations, self.cfg.max_new_tokens,
                                          self.cfg.batch_size, label=label, temperature=self.cfg.temperature,
                                          seed=self.cfg.seed, guard=LoopGuard.of(self.cfg), merge=False)
        self.model.train(was_training)
        scores = score(answers, self.conversations, self.cfg.scorer)
        if self.metric not in scores:
            raise UserError(f"eval.best_metric={self.metric}: the validation answers have no such score; they have "
                            f"{', '.join(sorted(k for k in scores if k not in ('test_examples',)))} (or eval_loss)")
        return float(scores[self.metric])


def selection(model, tokenizer, validation, eval_cfg) -> Selection | None:
    """The Selection of `eval.best_metric`, or None where the eval loss decides (the default)."""
    if eval_cfg.best_metric == EVAL_LOSS or validation is None:
        return None
    return Selection(model, tokenizer, validation, eval_cfg)
