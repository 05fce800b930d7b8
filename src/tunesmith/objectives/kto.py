"""KTO (Ethayarajh et al., 2024): unpaired answers, each marked desirable or not.

    z = max(0, mean over the micro-batch of (log pi(y'|x) - log ref(y'|x)))   (no gradient)
    desirable:   w_d * (1 - sigmoid(beta * (log pi(y|x) - log ref(y|x) - z)))
    undesirable: w_u * (1 - sigmoid(beta * (z - (log pi(y|x) - log ref(y|x)))))

z estimates the KL divergence to the reference from mismatched pairs: each prompt with another
example's answer (data/preference.py: the previous example's in the data's order, so the
reference side can be precomputed). The loss is averaged over the step's examples.
"""
from __future__ import annotations

import torch

from .base import Batch, masked_stat, stat
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
        if "reference" in tensors:
            return tensors["reference"].float()
        return torch.cat([per_sequence(self.reference.token_logps(tensors[k], model), tensors[k])
                          for k in ("answers", "kl")])

    def loss(self, model, tensors: dict):
        n = len(tensors["desirable"])
        reference = self.reference_logps(model, tensors)
        with torch.no_grad():  # the KL estimate carries no gradient
            kl = (per_sequence(token_logps(model, tensors["kl"]), tensors["kl"]) - reference[n:]).mean().clamp(min=0)
        ratios = per_sequence(token_logps(model, tensors["answers"]), tensors["answers"]) - reference[:n]
        good = tensors["desirable"]
        cfg = self.train_cfg
        losses = torch.where(good, cfg.kto_desirable_weight * (1 - torch.sigmoid(self.beta * (ratios - kl))),
                             cfg.kto_undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - ratios))))
        rewards = self.beta * ratios.detach()
        stats = {"kl": stat(kl), "rewards/desirable": masked_stat(rewards, good),
                 "rewards/undesirable": masked_stat(rewards, ~good)}
        return {"examples": losses.sum()}, stats
