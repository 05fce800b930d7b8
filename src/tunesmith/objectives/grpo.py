"""GRPO (Shao et al., 2024), with the DAPO / Dr. GRPO normalisations: reward-driven tuning.

For every prompt of a micro-batch, G answers are sampled from the model being trained
(rollout.py) and scored by the user's scorers (rewards.py). Each answer's advantage is its reward
relative to its group: A = (r - mean) / (std + 1e-4) (std: the group's, Bessel-corrected; not
divided with `train.scale_rewards: false`). Per answer token t, at the sampling temperature:

    ratio = pi(t) / pi_old(t)    (pi_old: the policy that sampled; one update per sample, so = 1 in value)
    loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * ratio * KL_t,
    KL_t = exp(ref(t) - pi(t)) - (ref(t) - pi(t)) - 1          (reference: the adapters disabled)

(KL_t weighted by the ratio, as DeepSeek-V3.2 and TRL do: its value is unchanged on-policy, and its
gradient becomes the unbiased gradient of the reverse KL)
summed over the step's answer tokens and divided by (`train.grpo_loss`) their number (dapo), by
answers x max_completion_tokens (dr_grpo), or per answer by its length, then by the number of
answers (grpo). Recorded per step: each scorer's reward mean and within-group std, the total
reward's, the KL, the answers' length, the share cut at max_completion_tokens (warned of once
where half a batch's are) and the share of clipped ratios.

`train.batch_size` counts prompts here: a micro-batch holds batch_size x G answers.
"""
from __future__ import annotations

import os

import torch

from ..training import distributed
from ..data.tokenize import IGNORE, Encoded, stop_ids
from ..progress import say
from .base import Batch, Objective, stat
from .logps import per_sequence, sequence_batch, token_logps
from .rewards import Rewards
from .rollout import sample, stream_seed

TERMS = {"dapo": "tokens", "dr_grpo": "answer_slots", "grpo": "answers"}


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, each group's std) of rewards laid out group after group."""
    grouped = rewards.view(-1, group)
    std = grouped.std(dim=1, keepdim=True) if group > 1 else torch.zeros_like(grouped[:, :1])
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (std + 1e-4)
    return advantages.reshape(-1), std.reshape(-1)


class GRPO(Objective):
    name = "grpo"
    SHOWN = {"reward/total/mean": "reward"}

    def __init__(self, cfg, reference, layout, pad_id, tokenizer):
        super().__init__(cfg, reference, layout, pad_id)
        self.terms = (TERMS[cfg.train.grpo_loss],)
        self.tokenizer = tokenizer
        self.rewards = Rewards(cfg.train.rewards, cfg.train.reward_weights)
        self.model = None  # the model to sample from; set by `prepare`
        self.warned_of_cut = False

    def prepare(self, model, splits: list, ranks: distributed.Ranks = distributed.SINGLE) -> None:
        self.model = model  # sampled from online: nothing to precompute, on any rank

    def batch(self, examples: list, key=None) -> Batch:
        cfg = self.train_cfg
        group = cfg.group_size
        stops = stop_ids(self.tokenizer, self.model)
        answers = sample(self.model, [e.input_ids for e in examples], group, cfg.max_completion_tokens,
                         cfg.temperature, self.pad_id, stops, stream_seed(cfg.seed, key))
        texts = [self.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        references = [e.reference for e in examples for _ in range(group)]
        totals, each = self.rewards.score(texts, references)
        advantages, _ = group_advantages(torch.tensor(totals, dtype=torch.float32), group, cfg.scale_rewards)
        cut = sum(len(a) >= cfg.max_completion_tokens and a[-1] not in stops for a in answers)
        self._warn_of_cut_answers(cut, len(answers))
        return self.rollout_batch([e.input_ids for e in examples for _ in range(group)], answers, advantages,
                                  {**_reward_stats(totals, each, group), "completion_cut": (float(cut), float(len(answers)))})

    def _warn_of_cut_answers(self, cut: int, answers: int) -> None:
        """Once a run, where half or more of a batch's answers ran to max_completion_tokens without
        ending: the rewards then judge cut answers (the run still trains; the records keep the share)."""
        if self.warned_of_cut or 2 * cut < answers:
            return
        self.warned_of_cut = True
        if os.environ.get("RANK", "0") == "0":
            say(f"warning: {cut} of {answers} sampled answers reached train.max_completion_tokens "
                f"({self.train_cfg.max_completion_tokens}) without ending: the rewards judge cut answers "
                "(raise train.max_completion_tokens; metrics.jsonl: objective/completion_cut)")

    def rollout_batch(self, prompts: list[list[int]], answers: list[list[int]], advantages: torch.Tensor,
                      stats: dict | None = None, old_logps: torch.Tensor | None = None) -> Batch:
        """The training batch of sampled answers (each after its prompt, labels on the answer) with
        their advantages; `old_logps` per answer token where the sampling policy differs from the
        current one (tests; several updates per sample)."""
        sequences = [Encoded(list(p) + list(a), [IGNORE] * len(p) + list(a)) for p, a in zip(prompts, answers)]
        tensors = sequence_batch(sequences, self.layout, self.pad_id)
        tensors["advantages"] = advantages.float()
        if old_logps is not None:
            tensors["old_logps"] = old_logps
        lengths = [len(a) for a in answers]
        counts = {"tokens": sum(lengths), "answers": len(answers),
                  "answer_slots": len(answers) * self.train_cfg.max_completion_tokens}
        stats = {**(stats or {}), "completion_length": (float(sum(lengths)), float(len(lengths)))}
        return Batch(tensors, {self.terms[0]: counts[self.terms[0]]}, sum(len(s.input_ids) for s in sequences), stats)

    def loss(self, model, tensors: dict):
        cfg = self.train_cfg
        # The reference first: its forward (no gradients) frees all it makes before the policy's keeps anything.
        reference = self.reference.token_logps(tensors, model, cfg.temperature) if self.beta else None
        logps = token_logps(model, tensors, cfg.temperature)
        old = tensors.get("old_logps")
        ratio = torch.exp(logps - (logps.detach() if old is None else old))
        advantage = tensors["advantages"].index_select(0, tensors["label_sequence"])
        low, high = 1 - cfg.clip_epsilon, 1 + cfg.clip_epsilon
        per_token = -torch.min(ratio * advantage, ratio.clamp(low, high) * advantage)
        clipped = ((ratio < low) & (advantage < 0)) | ((ratio > high) & (advantage > 0))
        stats = {"clip_fraction": stat(clipped.float())}
        if self.beta:
            gap = reference - logps
            kl = torch.exp(gap) - gap - 1
            per_token = per_token + self.beta * kl * ratio  # ratio: the unbiased reverse-KL gradient
            stats["kl"] = stat(kl)
        if self.terms[0] == "answers":
            total = (per_sequence(per_token, tensors) / tensors["sequence_labels"].clamp(min=1)).sum()
        else:
            total = per_token.sum()
        return {self.terms[0]: total}, stats

    @torch.no_grad()
    def evaluate(self, model, split, batch_size: int, ranks=None) -> float:
        """Minus the mean reward of greedy answers to the split's prompts (lower is better, as for a loss)."""
        from ..training import distributed

        ranks = ranks or distributed.SINGLE
        mine = list(range(ranks.rank, len(split), ranks.world))
        answers = sample(model, [split.encoded[i].input_ids for i in mine], 1, self.train_cfg.max_completion_tokens,
                         None, self.pad_id, stop_ids(self.tokenizer, model), batch_size=batch_size)
        texts = [self.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        totals, _ = self.rewards.score(texts, [split.encoded[i].reference for i in mine])
        total, count = ranks.sum(sum(totals), len(totals))
        return -total / max(1, count)


def _reward_stats(totals: list[float], each: dict[str, list[float]], group: int) -> dict[str, tuple[float, float]]:
    """Mean and within-group std of each scorer's rewards and of the total, as (sum, count) pairs."""
    stats = {}
    for name, values in [*each.items(), ("total", totals)]:
        tensor = torch.tensor(values, dtype=torch.float32)
        spread = tensor.view(-1, group).std(dim=1) if group > 1 else torch.zeros(len(values) // group)
        stats[f"reward/{name}/mean"] = (float(tensor.sum()), float(len(values)))
        stats[f"reward/{name}/std"] = (float(spread.sum()), float(len(spread)))
    return stats
