"""Answers sampled from the model being trained: the prompts as evaluation renders them (chat
template with the generation prompt, data/prompts.py), left-padded into one batch, decoded with a
KV cache. Each answer ends at its end-of-turn token, which it keeps (it carries a label, as in
SFT), or at max_new_tokens.

Sampling draws from the model's own distribution at `temperature` (no top-k or top-p cut), so the
log-probabilities the loss computes at the same temperature are those of what was sampled. It is
seeded per micro-batch from the examples it holds, on its own random stream: a resumed run samples
the same answers, and the training RNG (dropout) is not touched. The adapters stay unmerged:
merging and unmerging in every step would round the frozen weights a little each time.
"""
from __future__ import annotations

import zlib

import torch

from ..data.tokenize import until_stop
from ..device import compute_device
from ..eval.decoding import sampling


def stream_seed(seed: int, key) -> int:
    """A seed for one micro-batch's sampling, from the run's seed and what identifies the batch."""
    return zlib.crc32(repr((seed, key)).encode())


@torch.no_grad()
def sample(model, prompts: list[list[int]], copies: int, max_new_tokens: int, temperature: float | None,
           pad_id: int, stops: list[int], seed: int = 0, batch_size: int = 64) -> list[list[int]]:
    """`copies` answers (token ids) for each prompt, the copies of a prompt next to each other;
    temperature None decodes greedily; `stops`: the ids that end an answer (data.tokenize.stop_ids)."""
    device = compute_device(model)
    was_training = model.training
    model.eval()
    rows = [p for p in prompts for _ in range(copies)]
    answers: list[list[int]] = []
    # the model's own top-k, top-p and penalties off: samples of the distribution the loss scores
    options = sampling(temperature)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in chunk], dtype=torch.long)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], dtype=torch.long)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stops,
                                 use_cache=True, **options)
            answers += [until_stop(row.tolist(), stops) for row in out[:, width:].cpu()]
    model.train(was_training)
    return answers

