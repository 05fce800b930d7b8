"""SimPO (Meng et al., 2024): preference by length-normalised log-probabilities, no reference model.

    loss = -log sigmoid(beta * (mean log p(c) - mean log p(r)) - gamma)

with each answer's log-probability averaged over its tokens, `beta` (default 2.0) the reward
scale and `train.simpo_gamma` the target margin. `train.label_smoothing` as in DPO.
"""
from __future__ import annotations

from .pairwise import PairObjective, halves, preference_loss, reward_stats


class SimPO(PairObjective):
    name = "simpo"

    def loss(self, model, tensors: dict):
        logps, lengths = self.policy(model, tensors)
        chosen, rejected = halves(logps / lengths)
        margin = self.beta * (chosen - rejected) - self.train_cfg.simpo_gamma
        losses = preference_loss(margin, self.train_cfg.label_smoothing)
        return {"pairs": losses.sum()}, reward_stats(self.beta * chosen, self.beta * rejected)
