"""The training loop: token-normalised accumulation, warm-up + cosine AdamW, clipping, progress,
resumable checkpoints, and stops that lose nothing (signals, non-finite steps, out-of-memory)."""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, result_keys
from ..data.collate import collate, step_batches
from ..data.prepare import Split
from ..data.tokenize import IGNORE
from ..errors import Interrupted, UserError
from . import checkpoint as ckpt
from . import distributed
from .early_stop import BestWeights, overfitting
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
    resumed_from: int | None = None
    best_step: int | None = None  # step of the lowest eval loss
    restored_best: bool = False  # the weights returned are those of best_step, not of the last step
    final_eval: float | None = None  # eval loss of the weights returned, where fit measured it
    full_state: dict | None = None  # FSDP2: the gathered, unsharded weights (the model itself stays sharded)

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.seconds if self.seconds else 0.0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def optimizer_steps(split: Split, cfg: Config, flat: bool = False):
    """Endless, deterministic stream of optimizer steps, each a list of micro-batches of example indices.

    Padding-free (`flat`), a micro-batch holds up to batch_size x max_seq_len tokens: the most a
    padded one can hold, so the memory plan (plan/memory.py, batch x seq) bounds it as well."""
    lengths = [len(e.input_ids) for e in split.encoded]
    budget = cfg.train.batch_size * cfg.data.max_seq_len if flat else None
    return step_batches(lengths, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed, budget)


def padding_free(model, packing: bool) -> bool:
    """Whether micro-batches go as one unpadded row: where the attention keeps the sequences of
    a row apart (training/attention.py, installed on the CPU) and the rows are not packed already."""
    from . import attention

    return getattr(model.config, "_attn_implementation", None) == attention.NAME and not packing


def total_steps(cfg: Config, n_examples: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = math.ceil(n_examples / cfg.train.batch_size) / cfg.train.grad_accum
    return max(1, math.ceil(cfg.train.epochs * per_epoch))


@torch.no_grad()
def eval_loss(model, split: Split, batch_size: int, pad_id: int, ranks: distributed.Ranks = distributed.SINGLE,
              loss_module=None) -> float:
    """Mean loss per label token over the split; ranks share the batches and sum their results.

    `loss_module` (batch -> (sum, count)) is the distributed wrapper during training: sharded
    weights are gathered around its forward."""
    compute = loss_module or (lambda batch: label_loss_sum(model, batch))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(split)), key=lambda i: len(split.encoded[i].input_ids))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    # Every rank runs the same number of forwards (collectives must pair up); a rank with no batch
    # left repeats the first one and counts nothing.
    for turn in range(math.ceil(len(batches) / ranks.world)):
        index = turn * ranks.world + ranks.rank
        batch = collate([split.encoded[i] for i in batches[index if index < len(batches) else 0]], pad_id)
        loss, n = compute(batch)
        if index < len(batches):
            total, count = total + float(loss), count + n
    model.train(was_training)
    total, count = ranks.sum(total, count)
    return total / max(1, count)


@contextlib.contextmanager
def deferred_signals():
    """SIGTERM/SIGINT only set a flag: the loop finishes its step and checkpoints before stopping."""
    caught: list[int] = []
    handled = (signal.SIGTERM, signal.SIGINT)
    try:
        previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in handled}
    except ValueError:  # not the main thread: leave signals alone
        yield caught
        return
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _libc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def release_freed_memory(model) -> None:
    """Hand memory freed by the last step back to the system (CPU only).

    glibc keeps freed activations in its heaps, and as micro-batch lengths vary the next step's
    tensors do not fit the holes: resident memory crept up step by step to 1.5 GiB above what
    was live (default model, 4 x 489 tokens). Trimming once per step kept speed and lowered the
    peak by 0.5 GiB; a low mmap threshold does the same per tensor but halved the speed.
    """
    if _TRIM is not None and next(model.parameters()).device.type == "cpu":
        _TRIM(0)


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def fit(model, train: Split, validation: Split | None, cfg: Config, pad_id: int, log: MetricLog,
        run_dir: Path | None = None, on_eval=None, ranks: distributed.Ranks = distributed.SINGLE) -> FitResult:
    """Train; `on_eval(step, eval_loss) -> bool` may ask to stop early (True).

    Under torchrun every rank calls fit alike; `log` writes only on rank 0 (api.train hands the
    others a silent one)."""
    torch.manual_seed(cfg.train.seed)
    if cfg.data.packing:  # micro-batches of packed rows; steps and resume positions count rows
        from ..data.packing import pack_split

        train = pack_split(train, cfg.data.max_seq_len)
    # Looked up at call time, so a test can wrap label_loss_sum; wrapped before the optimizer is
    # built, as FSDP2 replaces the parameters with sharded ones.
    loss_module, grad_scale = distributed.wrap(model, lambda m, b: label_loss_sum(m, b), ranks, cfg.train.fsdp)
    state_owner = loss_module if ranks.fsdp else model  # what checkpoints save and restore
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused: one kernel per tensor instead of a dozen small ops each (a LoRA has hundreds of small
    # tensors, and on a busy CPU every op pays a thread wake-up). FSDP2's DTensors keep the default.
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=None if ranks.fsdp else True)
    steps = total_steps(cfg, len(train))
    scheduler = warmup_cosine(optimizer, steps, int(steps * cfg.train.warmup_ratio), cfg.train.min_lr_ratio)
    ckpt_dir = run_dir / "checkpoints" if run_dir else None
    settings = result_keys(cfg)
    state = ckpt.TrainState(config_hash=ckpt.config_hash(settings))
    result = FitResult()
    if ckpt_dir and cfg.train.resume:
        found = ckpt.newest_usable(ckpt_dir, say)
        if found:
            ckpt.check_same_settings(found, settings)
            state = ckpt.load_checkpoint(found, state_owner, optimizer, scheduler)
            result.resumed_from = state.step
            say(f"resuming from {found} (step {state.step} of {steps})")
            log.truncate_after(state.step)
    # Rank 0 keeps the best weights on disk; other ranks hold their (identical) replica's in memory.
    best = (BestWeights.reopen(run_dir / "best.safetensors", state.best_step, state.best_eval)
            if run_dir and ranks.main else BestWeights())
    warned_overfitting = False
    flat = padding_free(model, cfg.data.packing)
    stream = optimizer_steps(train, cfg, flat)
    consumed = 0
    while consumed < state.micro_batches:  # the same order as an uninterrupted run: skip what was consumed
        consumed += len(next(stream))
    split = 1  # micro-batches are cut into this many parts after an out-of-memory error
    progress = Progress(steps, quiet=not ranks.main)
    model.train()
    window_tokens, window_start = 0, time.perf_counter()
    start = time.perf_counter()
    bad_in_row = 0
    with deferred_signals() as caught:
        for step in range(state.step + 1, steps + 1):
            indices = next(stream)
            state.micro_batches += len(indices)
            while True:
                try:
                    step_loss, tokens = _accumulate(loss_module, train, indices, split, pad_id, ranks, grad_scale,
                                                    flat)
                    break
                except RuntimeError as err:
                    if not is_out_of_memory(err):
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    biggest = max(len(i) for i in indices)
                    if not cfg.train.auto_micro_batch or math.ceil(biggest / split) <= 1:
                        raise UserError(
                            f"out of memory at step {step} with micro-batch {math.ceil(biggest / split)}: lower "
                            "train.batch_size (raise train.grad_accum to keep the step size), data.max_seq_len, "
                            "or set train.auto_micro_batch=true") from None
                    split *= 2
                    say(f"out of memory: micro-batch now {math.ceil(biggest / split)}, same samples per step")
            grad_norm = _clip(params, cfg.train.max_grad_norm)
            if cfg.train.log_sample_ids:
                log.write(event="samples", step=step, ids=[i for batch in indices for i in batch])
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                # A non-finite loss or gradient never reaches the weights.
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.step = step
                state.skipped_steps.append(step)
                bad_in_row += 1
                log.write(event="skipped_step", step=step, loss=step_loss, grad_norm=grad_norm)
                say(f"step {step}: non-finite loss ({step_loss}) or gradient norm ({grad_norm}); step skipped")
                if bad_in_row >= cfg.train.max_bad_steps:
                    raise UserError(
                        f"training stopped at step {step}: {bad_in_row} steps in a row had a non-finite loss or "
                        f"gradient. Likely cause: learning rate too high (train.lr={cfg.train.lr}), fp16 overflow "
                        "(use bfloat16 or float32), or broken data; the last good checkpoint is kept")
                continue
            bad_in_row = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            release_freed_memory(model)
            state.step = step
            state.train_tokens += tokens
            state.losses.append(step_loss)
            window_tokens += tokens
            if step % cfg.train.log_every == 0 or step == steps:
                now = time.perf_counter()
                speed = window_tokens / (now - window_start)
                lr = scheduler.get_last_lr()[0]
                log.write(event="train", step=step, loss=step_loss, lr=lr, grad_norm=grad_norm,
                          tokens_per_second=speed, tokens=state.train_tokens)
                progress.update(step, loss=step_loss, lr=lr, **{"tok/s": int(speed)})
                window_tokens, window_start = 0, now
            stop = False
            if validation and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != steps:
                value = eval_loss(model, validation, cfg.eval.batch_size, pad_id, ranks, loss_module)
                result.eval_losses.append((step, value))
                log.write(event="eval", step=step, eval_loss=value, perplexity=math.exp(min(value, 50)))
                if state.best_eval is None or value < state.best_eval:
                    state.best_eval, state.best_step = value, step
                if cfg.eval.restore_best:
                    best.offer(model, step, value)
                if not warned_overfitting and overfitting(state.losses, result.eval_losses):
                    warned_overfitting = True
                    log.write(event="overfitting", step=step)
                    say(f"step {step}: the eval loss rose three times in a row while the training loss fell: "
                        "the model is overfitting; consider fewer steps, a lower lr or eval.patience")
                stop = bool(on_eval and on_eval(step, value))
            signalled = ranks.any(bool(caught))  # ranks stop at the same step, whichever got the signal
            if ckpt_dir and (signalled or stop or step == steps
                             or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)):
                saved = ckpt.save_checkpoint(ckpt_dir, state_owner, optimizer, scheduler, state,
                                             cfg.train.keep_checkpoints, settings, ranks)
                if signalled:
                    raise Interrupted(caught[0] if caught else signal.SIGTERM, saved)
            elif signalled:
                raise Interrupted(caught[0] if caught else signal.SIGTERM, None)
            if stop:
                break
    _return_best(model, best, validation, cfg, pad_id, log, state.step, result, ranks, loss_module)
    if ranks.fsdp:
        result.full_state = distributed.full_state_dict(loss_module)
    result.steps = state.step
    result.train_tokens = state.train_tokens
    result.losses = state.losses
    result.skipped_steps = state.skipped_steps
    result.seconds = time.perf_counter() - start
    return result


def _return_best(model, best: BestWeights, validation, cfg: Config, pad_id: int, log, step: int,
                 result: FitResult, ranks: distributed.Ranks = distributed.SINGLE, loss_module=None) -> None:
    """Put back the weights of the lowest eval loss when the last step's are worse."""
    result.best_step = best.step
    if not (validation and cfg.eval.restore_best and best.step is not None and best.step != step):
        return
    last = result.eval_losses[-1] if result.eval_losses else None
    final = (last[1] if last and last[0] == step  # ranks evaluate together, through the training wrapper
             else eval_loss(model, validation, cfg.eval.batch_size, pad_id, ranks, loss_module))
    result.final_eval = final
    if best.value < final:
        best.restore(model)
        result.restored_best, result.final_eval = True, best.value
        log.write(event="restore_best", step=step, best_step=best.step, eval_loss=best.value, last_eval_loss=final)
        say(f"restored the weights of step {best.step} (eval loss {best.value:.4f}; last step {final:.4f})")


def _accumulate(loss_module, train: Split, indices: list[list[int]], split: int, pad_id: int,
                ranks: distributed.Ranks = distributed.SINGLE, grad_scale: float = 1.0,
                flat: bool = False) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches; returns (mean loss, tokens).

    The loss is normalised by the label tokens of the whole step (over all ranks), not per
    micro-batch: a mean per micro-batch over-weights the tokens of short examples (the
    gradient-accumulation bug). Each rank takes its share of every micro-batch; a rank whose share
    is empty runs the first example with weight 0, so the gradient collectives pair up.
    """
    parts = [piece for batch in indices for piece in _cut(batch, split)]
    step_labels = sum(_shifted_labels(train.encoded[i]) for part in parts for i in part)
    total, tokens = 0.0, 0
    for number, part in enumerate(parts):
        mine = ranks.take(part)
        batch = collate([train.encoded[i] for i in (mine or part[:1])], pad_id, flat)
        weight = grad_scale / step_labels if mine else 0.0
        with distributed.no_sync(loss_module, last=number == len(parts) - 1):
            loss_sum, _ = loss_module(batch)
            (loss_sum * weight).backward()
        if mine:  # summed as a tensor: no host read (a device sync on GPUs) per micro-batch
            total = total + loss_sum.detach()
            tokens += sum(len(train.encoded[i].input_ids) for i in mine)
    total, tokens = ranks.sum(float(total), tokens)
    return total / step_labels, int(tokens)


def _shifted_labels(example) -> int:
    """Label tokens that are predicted (a label on the first position has nothing before it)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def _cut(batch: list[int], parts: int) -> list[list[int]]:
    size = max(1, math.ceil(len(batch) / parts))
    return [batch[i:i + size] for i in range(0, len(batch), size)]


def _clip(params, max_norm: float | None) -> float:
    if max_norm is None:
        norms = [p.grad.detach().norm() for p in params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

