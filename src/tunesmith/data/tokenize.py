"""Chat messages -> token ids and labels, with the loss on assistant turns only.

The whole conversation is rendered once with the tokenizer's chat template and tokenised once;
character offsets then say which tokens belong to an assistant answer. Each answer's labels
run up to and including its end-of-turn token, so the model learns to stop, also where the pad
token equals the EOS token (labels, not the attention mask, decide what is learned).
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def label_count(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def answer_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character span of every assistant answer (with its end-of-turn)."""
    text = render(tokenizer, messages)
    eot = tokenizer.eos_token or ""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
        if not text.startswith(prompt):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        start, turn_end = len(prompt), len(render(tokenizer, messages[: index + 1]))
        stop = text.rfind(eot, start, turn_end) if eot else -1
        end = stop + len(eot) if stop >= 0 else turn_end
        spans.append((start, end))
    return text, spans


def encode(tokenizer, messages: list[dict], train_on_inputs: bool = False) -> Encoded:
    text, spans = answer_spans(tokenizer, messages)
    tokens = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = tokens["input_ids"]
    if train_on_inputs:
        return Encoded(ids, list(ids))
    labels = [IGNORE] * len(ids)
    for i, (begin, end) in enumerate(tokens["offset_mapping"]):
        if any(start <= begin < stop for start, stop in spans) and end > begin:
            labels[i] = ids[i]
    return Encoded(ids, labels)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt for generation: the messages before the last answer, plus the generation prompt."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
