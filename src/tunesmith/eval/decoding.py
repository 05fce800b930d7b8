"""How answers are decoded: greedy or seeded sampling, and the guard against answers that loop.
No torch at import: the command line builds a LoopGuard from its flags."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoopGuard:
    """Decoding against answers that repeat themselves, greedy decoding's common failure on small
    fine-tuned models; both off by default (eval.repetition_penalty, eval.no_repeat_ngram_size)."""

    repetition_penalty: float = 1.0  # CTRL's: scores of tokens already in the answer divided by this
    no_repeat_ngram_size: int = 0  # no token n-gram of this size twice in an answer; 0 = off

    @classmethod
    def of(cls, eval_cfg) -> "LoopGuard":
        return cls(eval_cfg.repetition_penalty, eval_cfg.no_repeat_ngram_size)

    def options(self) -> dict:
        """What is switched on, by generate's names for it."""
        options = {}
        if self.repetition_penalty != 1.0:
            options["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size:
            options["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return options

    def processors(self, prompt_width: int) -> dict:
        """model.generate's arguments for what is switched on, applied to the answer alone (the tokens after
        column `prompt_width`): transformers' own options also count the prompt, so a k-shot prompt's
        examples, or the question's own words, would be banned from or penalised in the answer."""
        from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

        processors = []
        if self.repetition_penalty != 1.0:
            processors.append(AnswerOnly(RepetitionPenaltyLogitsProcessor(self.repetition_penalty), prompt_width))
        if self.no_repeat_ngram_size:
            processors.append(AnswerOnly(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size), prompt_width))
        # The model's own settings of the same names are replaced, not applied on top.
        neutral = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
        return {"logits_processor": LogitsProcessorList(processors), **{k: neutral[k] for k in self.options()}} \
            if processors else {}

    def __str__(self) -> str:
        words = {"repetition_penalty": "repetition penalty {}", "no_repeat_ngram_size": "no repeated {}-grams"}
        return ", ".join(words[k].format(f"{v:g}") for k, v in self.options().items()) or "off"


class AnswerOnly:
    """A logits processor that sees the generated tokens only (those after the prompt's columns)."""

    def __init__(self, processor, prompt_width: int):
        self.processor, self.prompt_width = processor, prompt_width

    def __call__(self, input_ids, scores):
        return self.processor(input_ids[:, self.prompt_width:], scores)


# generate() takes every option a call leaves unset from the model's own generation_config: Qwen2.5
# Instruct ships repetition_penalty 1.05, top_p 0.8 and top_k 20, Gemma 3 top_k 64. Evaluation, GRPO's
# rollouts and the probes set them all, so that greedy is the argmax and sampling draws from the
# whole distribution whose log-probs GRPO trains on, whatever the model ships. (`chat` keeps them.)
NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
           "min_length": 0, "min_new_tokens": None, "bad_words_ids": None, "suppress_tokens": None,
           "begin_suppress_tokens": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
           "forced_bos_token_id": None, "forced_eos_token_id": None}
WHOLE_DISTRIBUTION = {"top_k": None, "top_p": 1.0, "typical_p": 1.0, "min_p": None, "epsilon_cutoff": 0.0,
                      "eta_cutoff": 0.0}  # sampling only (greedy reads none of them)


def sampling(temperature: float | None) -> dict:
    """generate's settings for greedy decoding (temperature None or 0) or sampling at `temperature`
    from the whole distribution, the model's own filters and penalties off (not seeded here)."""
    if not temperature or temperature <= 0:
        return {**NEUTRAL, "do_sample": False}
    return {**NEUTRAL, **WHOLE_DISTRIBUTION, "do_sample": True, "temperature": temperature}


def decoding(temperature: float = 0.0, seed: int = 0) -> dict:
    """generate's settings: greedy at temperature 0, else seeded sampling from the whole
    distribution (the loop guard is added per batch: LoopGuard.processors, whose settings win)."""
    import torch

    if temperature > 0:
        torch.manual_seed(seed)
    return sampling(temperature)
