"""One optimizer step outside the loop: how many a run has (`total_steps`), which examples each
draws (`optimizer_steps`), and its forward and backward passes with token-normalised accumulation
(`train_step`). training/loop.py `fit` runs them, clips the gradients and steps the optimizer;
the plan (plan/run.py) counts the same steps.
"""
from __future__ import annotations

import math

import torch

from ..config import Config
from ..data.collate import PADDED, PADDING_FREE, micro_batch, step_batches
from ..data.prepare import Split
from ..data.tokenize import IGNORE
from ..device import compute_device, to_device
from . import distributed


def optimizer_steps(split: Split, cfg: Config, layout: str = PADDED):
    """Endless, deterministic stream of optimizer steps, each a list of micro-batches of example indices.

    Padding-free, a micro-batch holds up to batch_size x max_seq_len tokens: the most a padded one
    can hold, so the memory plan (plan/memory.py, batch x seq) bounds it as well."""
    lengths = [len(e.input_ids) for e in split.encoded]
    # GRPO's examples are prompts, each trained as group_size sampled answers: cut by batch_size alone
    budget = (cfg.train.batch_size * cfg.data.max_seq_len if layout == PADDING_FREE and cfg.train.objective != "grpo"
              else None)
    return step_batches(lengths, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed, budget)


def total_steps(cfg: Config, n_examples: int) -> int:
    """train.max_steps, else the steps of train.epochs passes: every step draws batch_size x grad_accum
    examples and an epoch's remainder opens the next step (optimizer_steps), so no step is short."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * n_examples / (cfg.train.batch_size * cfg.train.grad_accum)))


def train_step(loss_module, train: Split, indices: list[list[int]], pad_id: int,
               ranks: distributed.Ranks = distributed.SINGLE, grad_scale: float = 1.0, layout: str = PADDED,
               pieces: int = 1) -> tuple[torch.Tensor, int]:
    """Forward and backward over one optimizer step's micro-batches (the gradients accumulate in
    .grad); returns (mean loss per label token as a 0-dim fp32 tensor on the device, tokens).

    The loss is normalised by the label tokens of the whole step (over all ranks, counted on the
    host from the data), not per micro-batch: a mean per micro-batch over-weights the tokens of
    short examples (the gradient-accumulation bug). Each rank takes its share of every
    micro-batch; a rank whose share is empty runs the first example with weight 0, so the
    gradient collectives pair up. Nothing here reads the device: the losses are summed there (and
    over ranks by a collective on device tensors), the token count is the data's, so the host
    queues micro-batch after micro-batch and `fit` reads the loss with the gradient norm, once.
    """
    device = compute_device(loss_module)
    parts = [piece for batch in indices for piece in _cut(batch, pieces)]
    step_labels = sum(_shifted_labels(train.encoded[i]) for part in parts for i in part)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for number, part in enumerate(parts):
        mine = ranks.take(part)
        batch = to_device(micro_batch([train.encoded[i] for i in (mine or part[:1])], layout, pad_id), device)
        weight = grad_scale / step_labels if mine else 0.0
        with distributed.no_sync(loss_module, last=number == len(parts) - 1):
            loss_sum, _ = loss_module(batch)
            (loss_sum * weight).backward()
        if mine:
            total += loss_sum.detach().float()
    tokens = sum(len(train.encoded[i].input_ids) for part in parts for i in part)  # every rank's shares
    return ranks.sum_tensor(total) / step_labels, tokens


def _shifted_labels(example) -> int:
    """Label tokens that are predicted (a label on the first position has nothing before it)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def _cut(batch: list[int], parts: int) -> list[list[int]]:
    size = max(1, math.ceil(len(batch) / parts))
    return [batch[i:i + size] for i in range(0, len(batch), size)]
