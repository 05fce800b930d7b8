"""DPO (Rafailov et al., 2023): raise the chosen answer's log-probability ratio to the reference
above the rejected one's.

    loss = -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))

`train.label_smoothing` (conservative DPO) takes a share of the labels as flipped; `train.dpo_loss:
ipo` is IPO's squared loss, (h - 1 / (2 beta))^2, with each log-ratio averaged over its answer's
tokens. `train.sft_weight` w adds w x the mean negative log-likelihood of the chosen answers' tokens
(RPO, Pang et al., 2024), which keeps the answers' format while the preference term moves them. The
reference is the starting model: the adapters disabled (no second copy), or a frozen copy for full
fine-tuning; `train.precompute_ref` computes its log-probabilities once.
"""
from __future__ import annotations

from .base import token_stat
from .pairwise import PairObjective, halves, preference_loss, reward_stats


class DPO(PairObjective):
    name = "dpo"
    uses_reference = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sft_weight = self.train_cfg.sft_weight
        self.terms = ("pairs", "chosen_tokens") if self.sft_weight else ("pairs",)

    def loss(self, model, tensors: dict):
        reference = self.reference_logps(model, tensors)  # first: its forward frees all it makes before the policy's
        logps, lengths = self.policy(model, tensors)
        ratios = logps - reference
        chosen, rejected = halves(ratios)
        if self.train_cfg.dpo_loss == "ipo":  # its ratios (and so its rewards, as TRL's) per answer token
            chosen_len, rejected_len = halves(lengths)
            chosen, rejected = chosen / chosen_len, rejected / rejected_len
            losses = (chosen - rejected - 1 / (2 * self.beta)) ** 2
        else:
            losses = preference_loss(self.beta * (chosen - rejected), self.train_cfg.label_smoothing)
        terms, stats = {"pairs": losses.sum()}, reward_stats(self.beta * chosen, self.beta * rejected)
        if self.sft_weight:
            chosen_sum, _ = halves(logps)
            terms["chosen_tokens"] = -self.sft_weight * chosen_sum.sum()
            stats["nll"] = token_stat(-chosen_sum, halves(lengths)[0])  # the NLL in the loss, per chosen token
        return terms, stats
