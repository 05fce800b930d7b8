"""The training loop: token-normalised accumulation, warm-up + cosine AdamW, clipping, progress."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..config import Config
from ..data.collate import collate, length_grouped_batches
from ..data.prepare import Split
from .loss import label_loss_sum
from .progress import MetricLog, Progress
from .schedule import warmup_cosine


@dataclass
class FitResult:
    steps: int = 0
    train_tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.seconds if self.seconds else 0.0


def micro_batches(split: Split, batch_size: int, seed: int):
    """Endless stream of micro-batches (lists of example indices), epoch after epoch."""
    lengths = [len(e.input_ids) for e in split.encoded]
    epoch = 0
    while True:
        yield from length_grouped_batches(lengths, batch_size, seed, epoch)
        epoch += 1


def total_steps(cfg: Config, n_examples: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = math.ceil(n_examples / cfg.train.batch_size) / cfg.train.grad_accum
    return max(1, math.ceil(cfg.train.epochs * per_epoch))


@torch.no_grad()
def eval_loss(model, split: Split, batch_size: int, pad_id: int) -> float:
    """Mean loss per label token over the split."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(split)), key=lambda i: len(split.encoded[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = collate([split.encoded[i] for i in order[start:start + batch_size]], pad_id)
        loss, n = label_loss_sum(model, batch)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(1, count)


def fit(model, train: Split, validation: Split | None, cfg: Config, pad_id: int, log: MetricLog) -> FitResult:
    torch.manual_seed(cfg.train.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps = total_steps(cfg, len(train))
    scheduler = warmup_cosine(optimizer, steps, int(steps * cfg.train.warmup_ratio), cfg.train.min_lr_ratio)
    stream = micro_batches(train, cfg.train.batch_size, cfg.train.seed)
    progress = Progress(steps)
    result = FitResult()
    model.train()
    window_tokens, window_start = 0, time.perf_counter()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batches = [collate([train.encoded[i] for i in next(stream)], pad_id) for _ in range(cfg.train.grad_accum)]
        # Normalise by the label tokens of the whole optimizer step, not per micro-batch:
        # a mean per micro-batch over-weights the tokens of short examples.
        step_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        step_loss = 0.0
        for batch in batches:
            loss_sum, _ = label_loss_sum(model, batch)
            (loss_sum / step_labels).backward()
            step_loss += loss_sum.item()
        step_loss /= step_labels
        grad_norm = _clip(params, cfg.train.max_grad_norm)
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            # A non-finite loss or gradient never reaches the weights.
            optimizer.zero_grad(set_to_none=True)
            result.skipped_steps.append(step)
            log.write(event="skipped_step", step=step, loss=step_loss, grad_norm=grad_norm)
            scheduler.step()
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        result.train_tokens += tokens
        window_tokens += tokens
        result.losses.append(step_loss)
        if step % cfg.train.log_every == 0 or step == steps:
            now = time.perf_counter()
            speed = window_tokens / (now - window_start)
            lr = scheduler.get_last_lr()[0]
            log.write(event="train", step=step, loss=step_loss, lr=lr, grad_norm=grad_norm, tokens_per_second=speed,
                      tokens=result.train_tokens)
            progress.update(step, loss=step_loss, lr=lr, **{"tok/s": int(speed)})
            window_tokens, window_start = 0, now
        if validation and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != steps:
            value = eval_loss(model, validation, cfg.eval.batch_size, pad_id)
            result.eval_losses.append((step, value))
            log.write(event="eval", step=step, eval_loss=value, perplexity=math.exp(min(value, 50)))
    result.steps = steps
    result.seconds = time.perf_counter() - start
    return result


def _clip(params, max_norm: float | None) -> float:
    if max_norm is None:
        norms = [p.grad.detach().norm() for p in params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
