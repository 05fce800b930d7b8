"""ORPO (Hong et al., 2024): SFT on the chosen answer plus an odds-ratio term, no reference model.

    loss = NLL(chosen answer tokens) - beta * log sigmoid(log odds(c) - log odds(r)),
    odds(y) = p(y) / (1 - p(y)), with p(y) the per-token mean log-probability, exponentiated

The NLL is averaged over the chosen answers' tokens of the optimizer step, the odds-ratio term over
its pairs. (TRL's ORPOTrainer also puts the NLL on the prompt tokens; here, as in SFT and the
paper, only the answer is learned.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import stat, token_stat
from .pairwise import PairObjective, halves, reward_stats


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPO(PairObjective):
    name = "orpo"
    terms = ("pairs", "chosen_tokens")

    def loss(self, model, tensors: dict):
        logps, lengths = self.policy(model, tensors)
        chosen_sum, _ = halves(logps)
        chosen, rejected = halves(logps.float() / lengths)
        log_odds = (chosen - rejected) - (log1m_exp(chosen) - log1m_exp(rejected))
        ratio = F.logsigmoid(log_odds)
        stats = {**reward_stats(self.beta * chosen, self.beta * rejected), "log_odds": stat(log_odds),
                 "nll": token_stat(-chosen_sum, halves(lengths)[0])}  # the NLL in the loss, per chosen token
        return {"pairs": -(self.beta * ratio).sum(), "chosen_tokens": -chosen_sum.sum()}, stats
