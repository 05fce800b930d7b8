"""How answers are decoded: greedy or seeded sampling, and the guard against answers that loop.
No torch at import: the command line builds a LoopGuard from its flags."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoopGuard:
    """Decoding against answers that repeat themselves, greedy decoding's common failure on small
    fine-tuned models; both off by default (eval.repetition_penalty, eval.no_repeat_ngram_size)."""

    repetition_penalty: float = 1.0  # CTRL's: scores of tokens already in the text divided by this
    no_repeat_ngram_size: int = 0  # no token n-gram of this size twice in an answer; 0 = off

    @classmethod
    def of(cls, eval_cfg) -> "LoopGuard":
        return cls(eval_cfg.repetition_penalty, eval_cfg.no_repeat_ngram_size)

    def options(self) -> dict:
        """model.generate's arguments for what is switched on."""
        options = {}
        if self.repetition_penalty != 1.0:
            options["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size:
            options["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return options

    def __str__(self) -> str:
        words = {"repetition_penalty": "repetition penalty {}", "no_repeat_ngram_size": "no repeated {}-grams"}
        return ", ".join(words[k].format(f"{v:g}") for k, v in self.options().items()) or "off"


def decoding(temperature: float = 0.0, seed: int = 0, guard: LoopGuard = LoopGuard()) -> dict:
    """generate's settings: greedy at temperature 0, else seeded sampling from the whole
    distribution; with the loop guard's options."""
    import torch

    if temperature <= 0:
        return {"do_sample": False, **guard.options()}
    torch.manual_seed(seed)
    return {"do_sample": True, "temperature": temperature, "top_k": 0, **guard.options()}
