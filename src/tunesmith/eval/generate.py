"""Batched generation through the chat template, with a KV cache: greedy by default, seeded sampling otherwise."""
from __future__ import annotations

import contextlib
import time

import torch

from ..data.tokenize import IGNORE, encode, prompt_ids, stop_ids, until_stop
from ..progress import Progress
from .decoding import LoopGuard, decoding


@contextlib.contextmanager
def merged_adapter(model):
    """Fold LoRA weights into the base for the duration (same outputs, faster decoding).

    Not into a quantised (QLoRA) base: merging rounds the update into 4 bits and unmerging cannot
    give the trained weights back, so such a model decodes with the adapter beside the base."""
    merge = getattr(model, "merge_adapter", None)
    if merge is None or _quantized(model):
        yield model
        return
    merge()
    try:
        yield model
    finally:
        model.unmerge_adapter()


def merged_for_good(model):
    """The model with its LoRA weights folded into the base for the rest of its use (chat, compare, eval:
    nothing trains it again); a quantised base keeps the adapter beside it, as in `merged_adapter`.
    Merged and unmerged at each call instead, a bf16 base drifted by a rounding each time: after 100
    chat turns its weights were 1.7e-3 (relative) off, its logits up to 0.008."""
    if not hasattr(model, "merge_and_unload") or _quantized(model):
        return model
    return model.merge_and_unload()


def _quantized(model) -> bool:
    return getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)


@torch.no_grad()
def generate_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 96,
                     batch_size: int = 16, label: str = "generate", temperature: float = 0.0,
                     seed: int = 0, guard: LoopGuard = LoopGuard(), merge: bool = True) -> tuple[list[str], dict]:
    """Answers for the prompt part of each conversation, and speed figures.

    temperature 0 decodes greedily; above 0 it samples, seeded, so a run can be repeated. `merge`:
    fold LoRA weights into the base for the duration (faster; not in the middle of training)."""
    prompts = [prompt_ids(tokenizer, c) for c in conversations]
    answers, _, speed = _generate(model, tokenizer, prompts, None, max_new_tokens, batch_size, label,
                                  decoding(temperature, seed), guard, merge)
    return answers, speed


@torch.no_grad()
def answer_and_score(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 96,
                     batch_size: int = 16, label: str = "generate", temperature: float = 0.0, seed: int = 0,
                     guard: LoopGuard = LoopGuard()) -> tuple[list[str], list[float], list[int], dict] | None:
    """Answers to each conversation's prompt, and the loss per token of its reference answer with
    that answer's label count, from one forward pass per batch over prompt + reference: the
    prompt's part of that pass's KV cache is where generation starts, so each prompt goes through
    the model once, not twice (on k-shot and retrieval rows, whose prompts are several examples
    long, that halves the work). None where it cannot be done so (logits beyond the head's matmul,
    sliding-window caches, a prompt tokenised differently alone than in its conversation): the
    caller then scores and generates apart."""
    from ..training.loss import _core, needs_full_forward

    config = _core(model)[2]
    # The cache's layers as transformers builds them: layer_types where given, else sliding_window says.
    layer_types = getattr(config, "layer_types", None)
    full = set(layer_types) == {"full_attention"} if layer_types else getattr(config, "sliding_window", None) is None
    if needs_full_forward(model) or not full:
        return None
    prompts = [prompt_ids(tokenizer, c) for c in conversations]
    references = []
    for prompt, conversation in zip(prompts, conversations):
        whole = encode(tokenizer, conversation)
        if list(whole.input_ids[:len(prompt)]) != prompt:
            return None
        labelled = [j for j, label in enumerate(whole.labels[len(prompt):]) if label != IGNORE]
        references.append((list(whole.input_ids[len(prompt):]), labelled))
    answers, losses, speed = _generate(model, tokenizer, prompts, references, max_new_tokens, batch_size, label,
                                       decoding(temperature, seed), guard)
    return answers, losses, [len(labelled) for _, labelled in references], speed


def _generate(model, tokenizer, prompts: list[list[int]], references: list[tuple[list[int], list[int]]] | None,
              max_new_tokens: int, batch_size: int, label: str, sampling: dict, guard: LoopGuard,
              merge: bool = True):
    """Answers (and with `references`, (ids, labelled positions) per prompt, their losses) in
    batches of similar length, the LoRA weights merged for the duration; `sampling`: generate's
    decoding settings (see `decoding`). Each answer ends at its first end of turn (`stop_ids`)."""
    model.eval()
    pad, stops = tokenizer.pad_token_id, stop_ids(tokenizer, model)
    device = next(model.parameters()).device
    # Batches of similar length: of the prompt, or of prompt and reference where one forward takes both.
    lengths = [len(p) + (len(references[i][0]) if references else 0) for i, p in enumerate(prompts)]
    answers, losses = [""] * len(prompts), [0.0] * len(prompts)
    generated, start, done = 0, time.perf_counter(), 0
    progress = Progress(len(prompts), label, unit="answer")
    with merged_adapter(model) if merge else contextlib.nullcontext(model):
        for chunk in length_batches(lengths, batch_size):
            width = max(len(prompts[i]) for i in chunk)
            if references is None:
                ids, mask = _left_padded([prompts[i] for i in chunk], pad, width)
                ids, mask, cache = ids.to(device), mask.to(device), None
            else:
                ids, mask, cache = _score_references(model, [prompts[i] for i in chunk], [references[i] for i in chunk],
                                                     width, pad, device, chunk, losses)
            out = model.generate(input_ids=ids[:, :width], attention_mask=mask[:, :width], past_key_values=cache,
                                 max_new_tokens=max_new_tokens, **{**sampling, **guard.processors(width)},
                                 pad_token_id=pad, eos_token_id=stops)
            generated += _decode_rows(out, width, chunk, answers, tokenizer, stops)
            done += len(chunk)
            progress.update(done)
    seconds = time.perf_counter() - start
    return answers, losses, {"generated_tokens": generated, "seconds": seconds, "tokens_per_second": generated / seconds}


ROW_TOKENS = 1024  # a batch holds at most batch_size rows of this many tokens once padded


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices by length in batches of at most `batch_size` rows and of batch_size x ROW_TOKENS
    tokens padded to their longest (a longer row alone): a few long test examples neither pad a
    batch of short ones to their length nor make a batch that memory cannot hold."""
    budget = batch_size * ROW_TOKENS
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * lengths[i] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _score_references(model, prompts, references, width: int, pad: int, device, chunk: list[int],
                      losses: list[float]):
    """One forward over each prompt (left-padded to end at `width`) with its reference after it:
    the references' mean token losses go into losses[chunk[row]], and the KV cache is cut back to
    the prompts but their last token, which generate feeds."""
    from transformers import DynamicCache

    from ..training.loss import _core, head_token_losses

    decoder, head, config = _core(model)
    length = max(1, max(len(ids) for ids, _ in references))
    ids, mask = _left_padded(prompts, pad, width, [ids for ids, _ in references], length)
    # Reference token j of a row is predicted at column width + j - 1.
    positions = [row * (width + length) + width + j - 1 for row, (_, labelled) in enumerate(references)
                 for j in labelled]
    targets = [ids_[j] for ids_, labelled in references for j in labelled]
    ids, mask = ids.to(device), mask.to(device)
    cache = DynamicCache(config=config)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                     past_key_values=cache, use_cache=True).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, torch.tensor(positions, dtype=torch.long, device=device))
    token_losses = head_token_losses(head, picked, torch.tensor(targets, dtype=torch.long, device=device))
    for i, part in zip(chunk, token_losses.double().cpu().split([len(labelled) for _, labelled in references])):
        losses[i] = float(part.sum()) / max(1, len(part))
    cache.crop(-(length + 1))
    return ids, mask, cache


def _left_padded(prompts: list[list[int]], pad: int, width: int, after: list[list[int]] | None = None,
                 length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and mask with every prompt ending at column `width` (left padding), and `after[row]`
    (if given) from there, right-padded to `length` more columns. Built on the host."""
    ids = torch.full((len(prompts), width + length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        tail = after[row] if after else []
        ids[row, width - len(prompt):width + len(tail)] = torch.tensor(prompt + tail, dtype=torch.long)
        mask[row, width - len(prompt):width + len(tail)] = 1
    return ids, mask


def _decode_rows(out: torch.Tensor, width: int, chunk: list[int], answers: list[str], tokenizer,
                 stops: list[int]) -> int:
    """Each row's new tokens, up to its first stop token, decoded into answers[chunk[row]]; returns how many."""
    count = 0
    for row, i in enumerate(chunk):
        new = until_stop(out[row, width:].tolist(), stops, keep_stop=False)
        count += len(new)
        answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return count
