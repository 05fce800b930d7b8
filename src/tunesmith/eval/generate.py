"""Batched generation through the chat template, with a KV cache: greedy by default, seeded sampling otherwise."""
from __future__ import annotations

import contextlib
import time

import torch

from ..data.tokenize import prompt_ids
from ..progress import Progress


@contextlib.contextmanager
def merged_adapter(model):
    """Fold LoRA weights into the base for the duration (same outputs, faster decoding).

    Not into a quantised (QLoRA) base: merging rounds the update into 4 bits and unmerging cannot
    give the trained weights back, so such a model decodes with the adapter beside the base."""
    merge = getattr(model, "merge_adapter", None)
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if merge is None or quantized:
        yield model
        return
    merge()
    try:
        yield model
    finally:
        model.unmerge_adapter()


@torch.no_grad()
def generate_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 96,
                     batch_size: int = 16, label: str = "generate", temperature: float = 0.0,
                     seed: int = 0) -> tuple[list[str], dict]:
    """Answers for the prompt part of each conversation, and speed figures.

    temperature 0 decodes greedily; above 0 it samples, seeded, so a run can be repeated."""
    model.eval()
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    prompts = [prompt_ids(tokenizer, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    generated, start = 0, time.perf_counter()
    progress = Progress(len(prompts), label, unit="answer")
    with merged_adapter(model):
        for first in range(0, len(order), batch_size):
            chunk = order[first:first + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # built on the host, then moved
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            ids, mask = ids.to(device), mask.to(device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **sampling,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for row, i in enumerate(chunk):
                new = out[row, width:]
                new = new[new != pad] if pad != tokenizer.eos_token_id else _until_eos(new, tokenizer.eos_token_id)
                generated += len(new)
                answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
            progress.update(min(first + batch_size, len(order)))
    seconds = time.perf_counter() - start
    return answers, {"generated_tokens": generated, "seconds": seconds, "tokens_per_second": generated / seconds}


def _until_eos(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    hits = (tokens == eos).nonzero()
    return tokens[: int(hits[0])] if len(hits) else tokens
