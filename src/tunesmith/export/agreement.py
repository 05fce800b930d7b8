"""How far an exported file's logits are from the merged model's, at the same positions (GGUF checks,
in transformers' reading and in llama.cpp's)."""
from __future__ import annotations

import torch

DECIDED = 0.5  # logits by which the merged model's top token must lead the runner-up to count as decided


def agreement(theirs: torch.Tensor, reference: torch.Tensor, answers: torch.Tensor) -> dict:
    """How far a file's logits (positions x vocabulary) are from the merged model's: the max abs difference
    (also relative to the logit scale), top-1 agreement, mean KL divergence, the latter at answer positions
    (all, where there are none), and top-1 agreement at the decided ones."""
    at = answers if answers.any() else torch.ones(len(reference), dtype=torch.bool)
    diff = float((theirs - reference).abs().max())
    same = theirs.argmax(-1) == reference.argmax(-1)
    mine, file = reference[at].float(), theirs[at].float()
    kl = torch.cat([kl_divergence(a, b) for a, b in zip(mine.split(256), file.split(256))])  # bounded memory
    best_two = mine.topk(2, -1).values
    decided = best_two[:, 0] - best_two[:, 1] >= DECIDED
    return {"max_abs_diff": diff, "relative_diff": diff / (float(reference.abs().max()) or 1.0),
            "top1_agreement": float(same[at].float().mean()), "top1_all_positions": float(same.float().mean()),
            "kl_divergence": float(kl.mean()),
            "top1_decided": float(same[at][decided].float().mean()) if decided.any() else 1.0,
            "decided_positions": int(decided.sum())}


def kl_divergence(reference: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """KL(reference || theirs) per position, from logits."""
    mine = reference.log_softmax(-1)
    return (mine.exp() * (mine - theirs.log_softmax(-1))).sum(-1)
