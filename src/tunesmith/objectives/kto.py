"""KTO (Ethayarajh et al., 2024): unpaired answers, each marked desirable or not.

    z = max(0, mean over the step of (log pi(y'|x) - log ref(y'|x)))   (no gradient)
    desirable:   w_d * (1 - sigmoid(beta * (log pi(y|x) - log ref(y|x) - z)))
    undesirable: w_u * (1 - sigmoid(beta * (z - (log pi(y|x) - log ref(y|x)))))

z estimates the KL divergence to the reference from mismatched pairs: each prompt with another
example's answer (data/preference.py: the previous example's in the data's order, so the
reference side can be precomputed). The mean is over the optimizer step's examples (every
micro-batch, every rank; an evaluated split's), as one batch of them would give it: taken per
micro-batch, the step's gradient changed with how the step was cut (6 examples as 6 x 1 against
1 x 6: by 115%), and clamping small means at 0 biased z up. TRL averages per micro-batch over ranks.
The loss is averaged over the step's examples.
"""
from __future__ import annotations

import torch

from .base import Batch, masked_stat, on_device, stat
from .logps import per_sequence, sequence_batch, token_logps
from .pairwise import PairObjective


class KTO(PairObjective):
    name = "kto"
    terms = ("examples",)
    SHOWN = {"rewards/desirable": "desirable", "rewards/undesirable": "undesirable"}
    uses_reference = True

    def batch(self, examples: list, key=None) -> Batch:
        sequences = [e.completion for e in examples] + [e.kl for e in examples]
        tensors = {"answers": sequence_batch(sequences[:len(examples)], self.layout, self.pad_id),
                   "kl": sequence_batch(sequences[len(examples):], self.layout, self.pad_id)}
        tensors["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
        if all(e.reference is not None for e in examples):
            tensors["reference"] = torch.tensor([e.reference[0] for e in examples] + [e.reference[1] for e in examples])
        return Batch(tensors, {"examples": len(examples)}, sum(len(s.input_ids) for s in sequences))

    def held_out_figures(self, model, split, batch_size: int, ranks=None) -> dict:
        """Unpaired answers: no pair to compare (the eval loss only)."""
        return {}

    def reference_logps(self, model, tensors: dict) -> torch.Tensor:
        """The reference's log-probs of the answers, then of the KL sequences."""
        return torch.cat([self._reference(model, tensors, k) for k in ("answers", "kl")])

    def _reference(self, model, tensors: dict, side: str) -> torch.Tensor:
        """The reference's log-probs of one side: `answers` or `kl` (precomputed: answers first)."""
        if "reference" in tensors:
            n = len(tensors["desirable"])
            given = tensors["reference"].float()
            return given[:n] if side == "answers" else given[n:]
        return per_sequence(self.reference.token_logps(tensors[side], model), tensors[side])

    @torch.no_grad()  # the KL estimate carries no gradient
    def _kl_ratios(self, model, tensors: dict) -> torch.Tensor:
        return per_sequence(token_logps(model, tensors["kl"]), tensors["kl"]) - self._reference(model, tensors, "kl")

    def step_values(self, forward, batches, ranks, device) -> dict:
        """z over the step's (or split's) KL sequences: their (sum, count) from every batch first."""
        total = torch.zeros(2, device=device)
        with torch.no_grad():
            for tensors, counted in batches:
                pair = forward(on_device({**tensors, "kl_only": True}, device))
                total = total + pair if counted else total
        total = ranks.sum_tensor(total)
        return {"kl_z": (total[0] / total[1].clamp(min=1)).clamp(min=0)}

    def loss(self, model, tensors: dict):
        if tensors.get("kl_only"):  # step_values' pass: the KL sequences' ratios as (sum, count)
            return stat(self._kl_ratios(model, tensors))
        reference = self._reference(model, tensors, "answers")  # first: its forward frees all it makes
        kl = tensors["kl_z"] if "kl_z" in tensors else self._kl_ratios(model, tensors).mean().clamp(min=0)
        ratios = per_sequence(token_logps(model, tensors["answers"]), tensors["answers"]) - reference
        good = tensors["desirable"]
        cfg = self.train_cfg
        losses = torch.where(good, cfg.kto_desirable_weight * (1 - torch.sigmoid(self.beta * (ratios - kl))),
                             cfg.kto_undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - ratios))))
        rewards = self.beta * ratios.detach()
        stats = {"kl": stat(kl), "rewards/desirable": masked_stat(rewards, good),
                 "rewards/undesirable": masked_stat(rewards, ~good)}
        return {"examples": losses.sum()}, stats
