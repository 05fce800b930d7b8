"""What the pair objectives (DPO, ORPO, SimPO) share: a micro-batch of pairs as one batch of
sequences, chosen answers first and rejected ones after (one forward for both), and the
per-sequence log-probabilities of the policy and, where needed, of the reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..device import compute_device
from ..training import distributed
from .base import Batch, Objective, on_device, stat
from .logps import per_sequence, sequence_batch, token_logps


class PairObjective(Objective):
    terms = ("pairs",)
    SHOWN = {"rewards/accuracy": "acc", "rewards/margin": "margin"}
    uses_reference = False

    def batch(self, examples: list, key=None) -> Batch:
        sequences = [e.chosen for e in examples] + [e.rejected for e in examples]
        tensors = sequence_batch(sequences, self.layout, self.pad_id)
        if self.uses_reference and all(e.reference is not None for e in examples):
            tensors["reference"] = torch.tensor([e.reference[0] for e in examples] + [e.reference[1] for e in examples])
        counts = {"pairs": len(examples), "chosen_tokens": sum(e.chosen.label_count for e in examples)}
        return Batch(tensors, counts, sum(len(s.input_ids) for s in sequences))

    def policy(self, model, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs summed per sequence, label tokens per sequence), chosen first, for the model being trained."""
        return per_sequence(token_logps(model, tensors), tensors), tensors["sequence_labels"]

    def reference_logps(self, model, tensors: dict) -> torch.Tensor:
        """The reference's summed log-probs per sequence: precomputed, or one forward without gradients."""
        if "reference" in tensors:
            return tensors["reference"].float()
        return per_sequence(self.reference.token_logps(tensors, model), tensors)

    def prepare(self, model, splits: list, ranks: distributed.Ranks = distributed.SINGLE) -> None:
        """train.precompute_ref: every example's reference log-probs, once, before training; each rank
        computes every world-th batch and all ranks receive all of them (each computed all before)."""
        if not (self.uses_reference and self.train_cfg.precompute_ref):
            return
        device = compute_device(model)  # the run's: the batches are built on the host
        size = self.train_cfg.batch_size
        for split in splits:
            examples, mine = split.encoded, {}
            for start in range(ranks.rank * size, len(examples), size * ranks.world):
                chunk = examples[start:start + size]
                for example in chunk:
                    example.reference = None
                tensors = on_device(self.batch(chunk).tensors, device)
                values = self.reference_logps(model, tensors).tolist()
                mine.update(zip(range(start, start + len(chunk)), self.by_example(values, len(chunk))))
            for part in ranks.gather(mine):  # the model is not wrapped yet: no collective in its forwards
                for index, row in part.items():
                    examples[index].reference = row

    @torch.no_grad()
    def held_out_figures(self, model, split, batch_size: int, ranks=None) -> dict:
        """validation_pair_accuracy: the share of the validation pairs whose chosen answer the model
        itself finds likelier than the rejected one, by mean log-probability per answer token (ties
        count half). The loss alone says little of that (DPO's 0.693 is any model's before training);
        the base's figure beside the fine-tuned model's says whether the preference was learned."""
        ranks = ranks or distributed.SINGLE
        device = compute_device(model)
        was_training = model.training
        model.eval()
        wins, pairs = 0.0, 0
        for start in range(ranks.rank * batch_size, len(split), batch_size * ranks.world):
            chunk = split.encoded[start:start + batch_size]
            logps, counts = self.policy(model, on_device(self.batch(chunk).tensors, device))
            chosen, rejected = halves(logps / counts.clamp(min=1))
            wins += float((chosen > rejected).sum()) + 0.5 * float((chosen == rejected).sum())
            pairs += len(chunk)
        model.train(was_training)
        wins, pairs = ranks.sum(wins, pairs)
        return {"validation_pair_accuracy": wins / pairs} if pairs else {}

    @staticmethod
    def by_example(values: list[float], n: int) -> list[list[float]]:
        """Per-sequence values (all first sequences, then all second ones) regrouped per example."""
        return [list(values[i::n]) for i in range(n)]


def halves(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) values of a pair batch."""
    return values.chunk(2)


def preference_loss(margin: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-log sigmoid(margin), with a share `smoothing` of the labels taken as flipped (conservative DPO)."""
    loss = -F.logsigmoid(margin) * (1 - smoothing)
    return loss - F.logsigmoid(-margin) * smoothing if smoothing else loss


def reward_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The implicit rewards of chosen and rejected answers, how often chosen wins, and by how much."""
    return {"rewards/chosen": stat(chosen), "rewards/rejected": stat(rejected),
            "rewards/accuracy": stat((chosen > rejected).float()), "rewards/margin": stat(chosen - rejected)}
