"""The training loop: token-normalised accumulation, warm-up + cosine AdamW, clipping, progress,
resumable checkpoints, early stopping, and stops that lose nothing (signals, non-finite steps,
out-of-memory).

`fit` reads top to bottom like nanoGPT's or litgpt's loop; one optimizer step's forward and
backward passes are `train_step` (training/step.py), which the bench profiler runs as well.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import Config
from ..data.collate import PADDED
from ..data.prepare import Split
from ..device import compute_device, host_floats
from ..errors import Interrupted, UserError
from ..progress import Progress, say
from . import checkpoint as ckpt
from . import distributed
from .early_stop import EarlyStopping, overfitting, return_best, run_best_weights, shown_key
from .loggers import MetricLog
from .loss import label_loss_sum
from .memory import device_memory, is_out_of_memory, release_freed_memory
from .offload import offloaded
from .schedule import warmup_cosine
from .step import optimizer_steps, total_steps, train_step  # train_step looked up here: tests and bench wrap it


@dataclass
class FitResult:
    steps: int = 0
    train_tokens: int = 0  # since the run began, resumed or not
    tokens_trained: int = 0  # by this process (after the checkpoint it resumed from): the speed's
    seconds: float = 0.0  # this process's training time, evaluations left out
    total_seconds: float = 0.0  # with the training time of the steps before a resume
    losses: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    selected: list[tuple[int, float]] = field(default_factory=list)  # (step, key) of eval.best_metric, where set
    resumed_from: int | None = None
    best_step: int | None = None  # step of the best evaluation (eval.best_metric; the eval loss by default)
    restored_best: bool = False  # the weights returned are those of best_step, not of the last step
    final_eval: float | None = None  # eval loss of the weights returned, where fit measured it
    early_stopping: EarlyStopping | None = None
    gathered_state: dict | None = None  # FSDP2: rank 0's unsharded trained weights (the model itself stays sharded)

    @property
    def tokens_per_second(self) -> float | None:
        """None where this process trained nothing (a run ended at its checkpoint)."""
        return self.tokens_trained / self.seconds if self.seconds and self.tokens_trained else None


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


def eval_figures(value: float, objective: str) -> dict:
    """An eval event's figures. Perplexity only where the eval loss is a mean token loss (sft): for the
    other objectives (train.objective) it is a preference loss or minus a reward, whose exponential
    means nothing."""
    return {"eval_loss": value, **({"perplexity": math.exp(min(value, 50))} if objective == "sft" else {})}


def fit(model, train: Split, validation: Split | None, cfg: Config, pad_id: int, log: MetricLog,
        run_dir: Path | None = None, ranks: distributed.Ranks = distributed.SINGLE, layout: str = PADDED,
        evaluate: Callable | None = None, utilisation: Callable | None = None, objective=None,
        select=None, eval_seconds: float | None = None) -> FitResult:
    """Train the model on `train` (rows already in the run's batch `layout`).

    `evaluate(loss_module) -> eval loss` scores the validation split (given through the
    distributed wrapper, which gathers sharded weights); `utilisation(tokens/s) -> MFU` adds the
    model FLOPs utilisation to the progress records. Under torchrun every rank calls fit alike;
    `log` writes only on rank 0 (api.train hands the others a silent one). `objective` (objectives/,
    train.objective other than sft) supplies the loss and the step instead of the label loss.
    `select` (eval/selection.py, eval.best_metric): a metric of validation answers, scored at each
    evaluation, that the best weights and early stopping follow instead of the eval loss.
    `eval_seconds`: how long one evaluation took before training (the base's), for the ETA."""
    torch.manual_seed(cfg.train.seed)
    device = compute_device(model)
    # Looked up at call time, so a test can wrap label_loss_sum; wrapped before the optimizer is
    # built, as FSDP2 replaces the parameters with sharded ones.
    loss_fn = objective.loss if objective else (lambda m, b: label_loss_sum(m, b))  # objectives: issue 23
    loss_fn = offloaded(loss_fn, cfg.adapter.offload_activations and device.type == "cuda")
    loss_module, grad_scale = distributed.wrap(model, loss_fn, ranks, cfg.train.fsdp,
                                               cfg.train.fsdp_offload)
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused: one kernel per tensor instead of a dozen small ops each (a LoRA has hundreds of small
    # tensors, and on a busy CPU every op pays a thread wake-up). FSDP2's DTensors keep the default.
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=None if ranks.fsdp else True)
    steps = total_steps(cfg, len(train))
    scheduler = warmup_cosine(optimizer, steps, int(steps * cfg.train.warmup_ratio), cfg.train.min_lr_ratio)
    ckpt_dir = run_dir / "checkpoints" if run_dir else None
    settings = ckpt.resume_settings(cfg, train)
    state = ckpt.TrainState(config_hash=ckpt.config_hash(settings))
    stopper = EarlyStopping(cfg.eval.patience, cfg.eval.min_delta) if cfg.eval.patience and validation else None
    result = FitResult(early_stopping=stopper)
    resumed = _resume(ckpt_dir, cfg, settings, model, optimizer, scheduler, ranks, steps) if ckpt_dir else None
    if resumed is not None:
        state, found = resumed
        result.resumed_from = state.step
        say(f"resuming from step {state.step} of {steps} ({found})" if state.step < steps else
            f"ending the run at step {state.step}, its checkpoint's ({found}): nothing more to train")
        if stopper:
            stopper.restore(state.early_stopping)
    # Records of steps after the resumed one (or, starting afresh, every record) are about to be redone.
    log.truncate_after(state.step)
    best = run_best_weights(run_dir, state, ranks)
    warned_overfitting = False
    stream = optimizer_steps(train, cfg, layout)
    consumed = 0
    while consumed < state.micro_batches:  # the same order as an uninterrupted run: skip what was consumed
        consumed += len(next(stream))
    pieces = 1  # micro-batches are cut into this many parts after an out-of-memory error
    tokens_before, seconds_before = state.train_tokens, state.train_seconds  # the steps before the checkpoint's
    progress = Progress(steps, quiet=not ranks.main, unit="step")
    model.train()
    window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
    # The finite step losses since the last train record, state.losses[window_from:] (after a resume:
    # from the last record at or before the checkpoint's step, as an uninterrupted run has them).
    window_from = len(state.losses) - sum(1 for s in range(state.step - state.step % cfg.train.log_every + 1, state.step + 1)
                                          if s not in state.skipped_steps)
    start = time.perf_counter()
    eval_times = []  # seconds of each evaluation: not training time; the ETA counts those still to come
    bad_in_row = 0
    first = state.step + 1 if not (stopper and stopper.stopped_at) else steps + 1  # stopped early before a kill

    def record(step: int, step_loss: float, grad_norm: float, lr: float) -> None:
        """The train record and progress line of the steps since the last record."""
        nonlocal window_tokens, window_steps, window_start, window_from
        now = time.perf_counter()
        speed = window_tokens / max(1e-9, now - window_start)
        figures = {"mfu": round(utilisation(speed), 4)} if utilisation else {}
        # One step's loss is noisy: the record and the progress line also give the interval's
        # mean (as transformers' Trainer logs its loss), the step's own stays in `loss`.
        window_losses = state.losses[window_from:]
        mean_loss = sum(window_losses) / len(window_losses) if window_losses else step_loss
        if len(window_losses) > 1:
            figures["mean_loss"] = mean_loss
        log.write(event="train", step=step, loss=step_loss, lr=lr, grad_norm=grad_norm,
                  tokens_per_second=speed, step_seconds=(now - window_start) / window_steps,
                  tokens=state.train_tokens, **figures, **device_memory(device),
                  **(objective.step_metrics() if objective else {}))
        if evaluate:
            each = sum(eval_times) / len(eval_times) if eval_times else eval_seconds
            progress.expect(evaluations_ahead(step, steps, cfg.eval.every_steps, each), "evaluating")
        progress.update(step, loss=mean_loss, lr=lr, **{"tok/s": int(speed)}, **(objective.shown() if objective else {}))
        window_tokens, window_steps, window_start, window_from = 0, 0, now, len(state.losses)

    with deferred_signals() as caught:
        for step in range(first, steps + 1):
            indices = next(stream)
            state.micro_batches += len(indices)
            step_loss, tokens, pieces = _step_with_retries(loss_module, train, indices, pieces, pad_id, ranks,
                                                           grad_scale, layout, cfg, step, optimizer, objective)
            unread = objective.unread() if objective else []  # its statistics, read with the loss
            step_loss, grad_norm, *statistics = host_floats(step_loss, _clip(params, cfg.train.max_grad_norm), *unread)
            if objective:  # the step's one read, above
                objective.settle(statistics)
            if cfg.train.log_sample_ids:
                log.write(event="samples", step=step, ids=[i for batch in indices for i in batch])
            state.step = step
            if math.isfinite(step_loss) and math.isfinite(grad_norm):
                bad_in_row = 0
                optimizer.step()
                state.train_tokens += tokens
                state.losses.append(step_loss)
                window_tokens += tokens
            else:  # a non-finite loss or gradient never reaches the weights
                bad_in_row += 1
                state.skipped_steps.append(step)
                log.write(event="skipped_step", step=step, loss=step_loss, grad_norm=grad_norm)
                progress.note(f"step {step}: non-finite loss ({step_loss}) or gradient norm ({grad_norm}); step skipped")
            lr = optimizer.param_groups[0]["lr"]  # the step's own (the scheduler is about to set the next one's)
            with warnings.catch_warnings():  # the schedule moves on past a skipped step: torch's warning says it should not
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            release_freed_memory(device)
            if bad_in_row >= cfg.train.max_bad_steps:
                raise UserError(
                    f"training stopped at step {step}: {bad_in_row} steps in a row had a non-finite loss or "
                    f"gradient. Likely cause: learning rate too high (train.lr={cfg.train.lr}), fp16 overflow "
                    "(use bfloat16 or float32), or broken data; the last good checkpoint is kept")
            window_steps += 1
            recorded = step % cfg.train.log_every == 0 or step == steps
            if recorded:
                record(step, step_loss, grad_norm, lr)
            stop = False
            if evaluate and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != steps:
                began = time.perf_counter()
                with progress.paused():
                    value = evaluate(loss_module)
                    picked = select(f"generate (validation, step {step})") if select else None
                spent = time.perf_counter() - began
                eval_times.append(spent)
                window_start += spent  # the training line's tokens/s leaves evaluation out
                result.eval_losses.append((step, value))
                figures = eval_figures(value, cfg.train.objective)
                key = select.key(picked) if select else value  # what the best weights and early stopping minimise
                if select:
                    figures[f"validation_{select.metric}"] = picked
                    result.selected.append((step, key))
                log.write(event="eval", step=step, **figures)
                if state.best_eval is None or key < state.best_eval:
                    state.best_eval, state.best_step = key, step
                progress.note(f"step {step}: eval loss {value:.4f}" + (f", {select.metric} {picked:.4f}" if select else "")
                              + (" (the best yet)" if state.best_step == step else
                                 f" (best {shown_key(select, state.best_eval)} at step {state.best_step})"))
                if cfg.eval.restore_best:
                    best.offer(model, step, key)
                if not warned_overfitting and overfitting(state.losses, result.eval_losses):
                    warned_overfitting = True
                    log.write(event="overfitting", step=step)
                    progress.note(f"step {step}: the eval loss rose three times in a row while the training loss fell: "
                                  "the model is overfitting; consider fewer steps, a lower lr or eval.patience")
                stop = bool(stopper and stopper(step, key))
                if stopper:
                    state.early_stopping = stopper.state()
            signalled = ranks.any(bool(caught))  # ranks stop at the same step, whichever got the signal
            if (stop or signalled) and not recorded:  # the last step trained has its record too
                record(step, step_loss, grad_norm, lr)
            if ckpt_dir and (signalled or stop or step == steps
                             or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)):
                state.train_seconds = seconds_before + time.perf_counter() - start - sum(eval_times)
                saved = ckpt.save_checkpoint(ckpt_dir, model, optimizer, scheduler, state,
                                             cfg.train.keep_checkpoints, settings, ranks)
                best.committed(ckpt.best_steps(ckpt_dir))
                if signalled:
                    raise Interrupted(caught[0] if caught else signal.SIGTERM, saved)
            elif signalled:
                raise Interrupted(caught[0] if caught else signal.SIGTERM, None)
            if stop:
                log.write(event="early_stop", step=step, best_step=stopper.best_step, best=shown_key(select, stopper.best, None),
                          **({"metric": select.metric} if select else {"best_eval_loss": stopper.best}))
                progress.note(f"early stop at step {step}: no {select.metric if select else 'eval-loss'} improvement over "
                              f"{cfg.eval.min_delta} in {cfg.eval.patience} evaluations (best "
                              f"{shown_key(select, stopper.best)} at step {stopper.best_step})")
                break
    progress.close()
    result.seconds = time.perf_counter() - start - sum(eval_times)
    result.total_seconds = seconds_before + result.seconds
    return_best(model, best, validation, cfg, log, state.step, result, evaluate, loss_module, select)
    if ranks.fsdp:  # scored while sharded, through the wrapper; then gathered once, to rank 0
        if evaluate and result.final_eval is None:
            result.final_eval = evaluate(loss_module)
        result.gathered_state = distributed.gathered_state(loss_module, trainable_only=hasattr(model, "peft_config"))
    result.steps, result.train_tokens, result.tokens_trained = state.step, state.train_tokens, state.train_tokens - tokens_before
    result.losses, result.skipped_steps = state.losses, state.skipped_steps
    return result


def evaluations_ahead(step: int, steps: int, every: int, each: float | None) -> float:
    """Seconds of the evaluations still to come after `step`: one every `every` steps before the
    last step, and the final one of the weights returned."""
    between = max(0, (steps - 1) // every - step // every) if every else 0
    return (between + 1) * each if each else 0.0


def _resume(ckpt_dir: Path, cfg: Config, settings: dict, owner, optimizer, scheduler,
            ranks: distributed.Ranks, steps: int) -> tuple[ckpt.TrainState, Path] | None:
    """Rank 0 picks the newest usable checkpoint and tells the others; every rank loads it, and one
    that cannot fails the job with a message (ranks must never continue from different states).
    `steps`: the run's length now, which may end it at the checkpoint's step."""
    if not cfg.train.resume:
        return None
    found = ckpt.newest_usable(ckpt_dir, say) if ranks.main else None
    found = ranks.broadcast(str(found) if found else None)
    if found is None:
        return None
    found = Path(found)
    ckpt.check_same_settings(found, settings, steps)
    try:
        loaded = ckpt.load_checkpoint(found, owner, optimizer, scheduler, ranks.rank)
    except Exception as err:  # noqa: BLE001 (anything that keeps this rank from the chosen state)
        raise UserError(f"rank {ranks.rank}: cannot load checkpoint {found} chosen by rank 0 "
                        f"({type(err).__name__}: {err}); is the run folder on storage every node sees?") from None
    return loaded, found


def _step_with_retries(loss_module, train: Split, indices, pieces: int, pad_id: int, ranks, grad_scale: float,
                       layout: str, cfg: Config, step: int, optimizer,
                       objective=None) -> tuple[torch.Tensor | float, int, int]:
    """train_step (or the objective's), cutting the micro-batches in halves after an out-of-memory error where allowed."""
    while True:
        try:
            if objective:
                loss, tokens = objective.train_step(loss_module, train, indices, pad_id, ranks, grad_scale, layout,
                                                    pieces, step)
            else:
                loss, tokens = train_step(loss_module, train, indices, pad_id, ranks, grad_scale, layout, pieces)
            return loss, tokens, pieces
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            optimizer.zero_grad(set_to_none=True)
            biggest = max(len(i) for i in indices)
            # Under several ranks a retry on one alone would pair its collectives with another step's
            if not cfg.train.auto_micro_batch or math.ceil(biggest / pieces) <= 1 or ranks.active:
                raise UserError(
                    f"out of memory at step {step} with micro-batch {math.ceil(biggest / pieces)}: lower "
                    "train.batch_size (raise train.grad_accum to keep the step size) or data.max_seq_len"
                    + (" (with several ranks nothing retries: their steps must stay paired)" if ranks.active
                       else ", or set train.auto_micro_batch=true")) from None
            pieces *= 2
            say(f"out of memory: micro-batch now {math.ceil(biggest / pieces)}, same samples per step")


def _clip(params, max_norm: float | None) -> torch.Tensor | float:
    """The gradients' total norm (clipped to max_norm where set), left on the device."""
    if max_norm is None:
        norms = [p.grad.detach().norm() for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else 0.0
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
