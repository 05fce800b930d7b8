"""Eval loss: mean loss per label token over a split, in the run's batch layout and on its device."""
from __future__ import annotations

import math

import torch

from ..data.collate import PADDED, micro_batch
from ..device import compute_device, to_device
from ..progress import Progress
from ..training import distributed
from ..training.loss import label_loss_sum


@torch.no_grad()
def eval_loss(model, split, batch_size: int, pad_id: int, ranks: distributed.Ranks = distributed.SINGLE,
              loss_module=None, layout: str = PADDED, label: str = "eval loss", quiet: bool = False) -> float:
    """Ranks share the batches and sum their results. Batches hold `batch_size` examples of similar
    length, padding-free where training runs so (the same attention, no padded positions).

    `loss_module` (batch -> (sum, count)) is the distributed wrapper during training: sharded
    weights are gathered around its forward."""
    compute = loss_module or (lambda batch: label_loss_sum(model, batch))
    device = compute_device(model)
    was_training = model.training
    model.eval()
    order = sorted(range(len(split)), key=lambda i: len(split.encoded[i].input_ids))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    turns = math.ceil(len(batches) / ranks.world)
    # the batches grow from the shortest examples to the longest: the ETA follows their tokens
    tokens = [sum(len(split.encoded[i].input_ids) for i in batches[turn * ranks.world]) for turn in range(turns)]
    progress = Progress(turns, label, quiet=quiet or not ranks.main or turns < 4, unit="batch", work=tokens)
    every = max(1, turns // 10)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    # Every rank runs the same number of forwards (collectives must pair up); a rank with no batch
    # left repeats the first one and counts nothing.
    for turn in range(turns):
        index = turn * ranks.world + ranks.rank
        examples = [split.encoded[i] for i in batches[index if index < len(batches) else 0]]
        loss, n = compute(to_device(micro_batch(examples, layout, pad_id), device))
        if index < len(batches):
            total += loss.detach().double()  # summed on the device: one host read at the end
            count += n
        if (turn + 1) % every == 0 or turn + 1 == turns:
            progress.update(turn + 1)
    model.train(was_training)
    if loss_module is not None:
        distributed.reshard(loss_module)
    total, count = ranks.sum(float(total), count)
    return total / max(1, count)
