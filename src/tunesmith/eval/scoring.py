"""Generate answers for a split's prompts and score them against its references."""
from __future__ import annotations

import json
from pathlib import Path

from ..data.tokenize import THINK_BLOCK
from ..data.tools import split_tools
from .decoding import LoopGuard
from .generate import generate_answers
from .metrics import Scorer, example_scores, load_scorer, mean_scores


def score_generation(model, tokenizer, conversations: list[list[dict]], eval_cfg, out: Path | None = None,
                     label: str = "model") -> dict:
    """Mean scores (and speed) of the model's answers to the conversations' last prompts; with `out`,
    the answers beside their references as JSONL."""
    conversations = conversations[: eval_cfg.test_limit] if eval_cfg.test_limit else conversations
    references = [c[-1]["content"] for c in conversations]
    answers, speed = generate_answers(model, tokenizer, conversations, eval_cfg.max_new_tokens, eval_cfg.batch_size,
                                      label=f"generate ({label})", temperature=eval_cfg.temperature,
                                      seed=eval_cfg.seed, guard=LoopGuard.of(eval_cfg))
    scores = score(answers, conversations, eval_cfg.scorer)
    scores["test_examples"] = len(references)
    scores["generated_tokens_per_second"] = round(speed["tokens_per_second"], 1)
    if out is not None:
        with open(out, "w", encoding="utf-8") as handle:
            for conversation, answer in zip(conversations, answers):
                handle.write(json.dumps({"prompt": conversation[-2]["content"], "reference": conversation[-1]["content"],
                                         "answer": answer}) + "\n")
    return scores


def score(answers: list[str], conversations: list[list[dict]], scorer: str | None = None) -> dict:
    """Mean scores of the answers to the conversations' last turns (`conversation_scores`); `scorer`
    ('module:function') adds the user's own metric."""
    return mean_scores(conversation_scores(answers, conversations, load_scorer(scorer) if scorer else None,
                                           scorer_name(scorer)))


def conversation_scores(answers: list[str], conversations: list[list[dict]], scorer: Scorer | None = None,
                        name: str = "custom") -> list[dict[str, float]]:
    """Per example: JSON references get field-level scores, free text exact match, normalised exact
    match, token F1 and ROUGE-L, and an answer that should call tools its calls' scores."""
    return example_scores([final_answer(a) for a in answers], [final_answer(c[-1]["content"]) for c in conversations],
                          scorer, name, [c[-1].get("tool_calls") for c in conversations],
                          [split_tools(c)[0] for c in conversations])


def final_answer(text: str) -> str:
    """The answer after its reasoning: a model trained on <think>...</think> (Qwen3's `reasoning_content`,
    whose tags are not special tokens) says it before the answer, and a reference may hold it too;
    scored whole, an exact answer read as wrong. Reasoning cut off unfinished leaves no answer."""
    if THINK_BLOCK.match(text):
        return THINK_BLOCK.sub("", text, count=1).strip()
    if text.lstrip().startswith(("<think>", "[THINK]")):
        return ""
    for close in ("</think>", "[/THINK]"):  # a template that opens the reasoning itself (DeepSeek-R1, Qwen3)
        if close in text:
            return text.split(close, 1)[1].strip()
    return text


def scorer_name(spec: str | None) -> str:
    return spec.rpartition(":")[2] if spec else "custom"
