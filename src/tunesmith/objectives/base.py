"""What every objective shares: the optimizer step over micro-batches, normalised once per step.

An objective turns a micro-batch's examples into a `Batch` (tensors, plus counts known on the
host: pairs, answer tokens, ...) and a batch into loss *sums* per count (`terms`) and statistics.
The step divides each term by its count over the whole optimizer step (all micro-batches, all
ranks), as SFT divides by the step's label tokens (training/step.py train_step): batch 8 x
accumulation 1 and batch 1 x accumulation 8 give the same gradients, except for GRPO, whose groups
never span two micro-batches. What every micro-batch's loss shares (KTO's KL estimate) is computed
over the whole step first (`step_values`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..device import compute_device, host_floats, to_device
from ..training import distributed


@dataclass
class Batch:
    tensors: dict  # collated sequences (objectives/logps.py sequence_batch) and per-example values
    counts: dict[str, int]  # term name -> what its sum is divided by, summed over the step
    tokens: int = 0  # tokens processed (for tokens/s)
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # host statistics: name -> (sum, count)


def stat(values: torch.Tensor) -> torch.Tensor:
    """(sum, count) of a statistic's values, detached, for averaging over a step."""
    values = values.detach().float().reshape(-1)
    # new_full writes the count on the device; torch.tensor(..., device=) would copy it there and wait
    return torch.stack([values.sum(), values.new_full((), float(values.numel()))])


def token_stat(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(sum, count) of a statistic per token: per-sequence sums over their token counts, so the step's
    figure is the mean over its tokens (a loss's token-weighted term), not a mean of sequence means."""
    return torch.stack([sums.detach().float().sum(), counts.detach().float().sum()])


def masked_stat(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`stat` of the values where `mask` holds, without indexing by it: on CUDA a boolean index has
    to learn its size from the device, a host synchronisation inside the micro-batch."""
    values, mask = values.detach().float().reshape(-1), mask.reshape(-1)
    return torch.stack([torch.where(mask, values, 0.0).sum(), mask.float().sum()])


class Objective:
    """Subclasses set `name` and implement `batch` and `loss`; `train_step` and `evaluate` are shared."""

    name = "objective"
    terms: tuple[str, ...] = ()  # the names of the loss sums `loss` returns, each with its count in Batch.counts
    SHOWN: dict[str, str] = {}  # statistic -> its label on the progress line (the loss alone says little here)

    def __init__(self, cfg, reference=None, layout: str = "padded", pad_id: int = 0):
        self.cfg, self.train_cfg = cfg, cfg.train
        self.beta = cfg.train.objective_beta()
        self.reference, self.layout, self.pad_id = reference, layout, pad_id
        self._metrics: dict[str, float] = {}
        self._unread = None  # the last step's statistics not yet read: (device keys, device values, host sums)

    # Implemented by each objective
    def batch(self, examples: list, key=None) -> Batch:
        """`key` identifies the micro-batch in the run (its step and examples), for seeding what it samples."""
        raise NotImplementedError

    def loss(self, model, tensors: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(loss sum per count name, statistics as stat() pairs)."""
        raise NotImplementedError

    def prepare(self, model, splits: list, ranks: distributed.Ranks = distributed.SINGLE) -> None:
        """Work done once before training (precomputed reference log-probs); nothing by default."""

    def step_values(self, forward, batches: list[tuple[dict, bool]], ranks: distributed.Ranks, device) -> dict:
        """Tensors every batch's loss receives beside its own: values estimated over a whole step (every
        micro-batch, every rank) or evaluated split, by a pass without gradients over its batches first.
        `batches`: (tensors, counted: whether this rank's examples) - every rank runs every forward, as
        the step does. `forward(tensors)` computes the loss as the step does. None by default."""
        return {}

    # Shared
    def train_step(self, loss_module, train, indices: list[list[int]], pad_id: int,
                   ranks: distributed.Ranks = distributed.SINGLE, grad_scale: float = 1.0, layout: str = "padded",
                   pieces: int = 1, step: int = 0) -> tuple[torch.Tensor, int]:
        """Forward and backward over one optimizer step (training/step.py train_step's signature, and
        the step's number); returns (loss as a device scalar, tokens). The step's statistics stay on
        the device until read: `fit` reads them with the loss and gradient norm (`unread`, `settle`);
        `last_metrics` reads them itself otherwise."""
        device = compute_device(loss_module)
        parts = [piece for batch in indices for piece in _cut(batch, pieces)]
        built = []
        for part in parts:  # all batches first: GRPO samples its answers here, and the counts must be known
            mine = ranks.take(part)
            examples = mine or part[:1]
            built.append((self.batch([train.encoded[i] for i in examples], key=(step, tuple(examples))), bool(mine)))
        totals = dict(zip(self.terms, ranks.sum(*[sum(b.counts[k] for b, mine in built if mine) for k in self.terms])))
        shared = self.step_values(loss_module, [(b.tensors, mine) for b, mine in built], ranks, device)
        loss_total = torch.zeros((), dtype=torch.float32, device=device)
        device_stats: dict[str, torch.Tensor] = {}  # the loss's statistics, (sum, count) on the device
        host_stats: dict[str, list[float]] = {}  # (sum, count) of those known on the host (GRPO's rewards)
        tokens = 0
        for number, (batch, mine) in enumerate(built):
            with distributed.no_sync(loss_module, last=number == len(built) - 1):
                terms, stats = loss_module(on_device({**batch.tensors, **shared}, device))
                loss = sum(value / max(1.0, totals[key]) for key, value in terms.items())
                (loss * (grad_scale if mine else 0.0)).backward()
            if mine:
                loss_total += loss.detach().float()
                tokens += batch.tokens
            # A rank without examples (batch_size 1 on 2 ranks) still names every statistic, counted 0
            # times: the sums below are collectives whose sizes must agree (DPO failed, GRPO hung).
            share = 1.0 if mine else 0.0
            for key, value in stats.items():
                device_stats[key] = device_stats.get(key, 0) + value.detach().float() * share
            for key, pair in batch.stats.items():
                host_stats[key] = [a + b * share for a, b in zip(host_stats.get(key, (0.0, 0.0)), pair)]
        keys = sorted(device_stats)
        summed = ranks.sum_tensor(torch.cat([loss_total.reshape(1)] + [device_stats[key].reshape(2) for key in keys]))
        host_keys = sorted(host_stats)
        tokens, *host_values = ranks.sum(tokens, *[v for key in host_keys for v in host_stats[key]])
        self._unread = (keys, summed[1:], dict(zip(host_keys, zip(host_values[::2], host_values[1::2]))))
        return summed[0], int(tokens)

    def unread(self) -> list[torch.Tensor]:
        """The last step's device statistics, as scalars for one read with the loss (fit's)."""
        return list(self._unread[1].unbind()) if self._unread else []

    def settle(self, values: list[float]) -> None:
        """The last step's statistics from their read values (`unread`'s order)."""
        keys, _, sums = self._unread
        sums = dict(sums)
        for n, key in enumerate(keys):
            pair = values[2 * n:2 * n + 2]
            sums[key] = [a + b for a, b in zip(sums.get(key, (0.0, 0.0)), pair)]
        self._metrics = {key: total / count for key, (total, count) in sorted(sums.items()) if count}
        self._unread = None

    @property
    def last_metrics(self) -> dict[str, float]:
        """The last step's statistics (read here if fit has not read them with its loss)."""
        if self._unread:
            self.settle(host_floats(*self.unread()))
        return self._metrics

    def shown(self) -> dict[str, float]:
        """The last step's figures the progress line shows beside the loss (`SHOWN`: statistic -> label)."""
        return {label: self.last_metrics[key] for key, label in self.SHOWN.items() if key in self.last_metrics}

    def step_metrics(self) -> dict[str, float]:
        """The last step's statistics, for the training records (metrics.jsonl)."""
        return {f"objective/{key}": round(value, 6) for key, value in self.last_metrics.items()}

    def held_out_figures(self, model, split, batch_size: int, ranks: distributed.Ranks = distributed.SINGLE) -> dict:
        """Figures of a model on the validation split beside its eval loss, for the base and the
        fine-tuned model alike (the pair objectives': pair accuracy); none by default."""
        return {}

    @torch.no_grad()
    def evaluate(self, model, split, batch_size: int, ranks: distributed.Ranks = distributed.SINGLE) -> float:
        """The objective's loss over a split (each term divided by its count over the whole split)."""
        device = compute_device(model)
        was_training = model.training
        model.eval()
        sums = dict.fromkeys(self.terms, 0.0)
        counts = dict.fromkeys(self.terms, 0.0)
        batches = [self.batch(split.encoded[start:start + batch_size])
                   for start in range(ranks.rank * batch_size, len(split), batch_size * ranks.world)]
        shared = self.step_values(lambda tensors: self.loss(model, tensors), [(b.tensors, True) for b in batches],
                                  ranks, device)
        for batch in batches:
            terms, _ = self.loss(model, on_device({**batch.tensors, **shared}, device))
            for key in self.terms:
                sums[key] = sums[key] + terms[key].float()  # read once below: a read per batch waited for the GPU
                counts[key] += batch.counts[key]
        model.train(was_training)
        flat = ranks.sum(*host_floats(*sums.values()), *counts.values())
        return sum(flat[i] / max(1.0, flat[len(self.terms) + i]) for i in range(len(self.terms)))


def _cut(batch: list[int], pieces: int) -> list[list[int]]:
    """A micro-batch in `pieces` parts (after an out-of-memory error)."""
    size = max(1, math.ceil(len(batch) / pieces))
    return [batch[i:i + size] for i in range(0, len(batch), size)]


def on_device(tensors: dict, device) -> dict:
    """A batch's tensors on the run's device, nested batches (KTO's answers and KL sequences) too."""
    moved = to_device(tensors, device)
    return {k: on_device(v, device) if isinstance(v, dict) else v for k, v in moved.items()}
