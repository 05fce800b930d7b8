"""When to stop: early stopping on the eval loss, the best weights kept (and put back at the end), and an
overfitting alarm."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..progress import say
from ..runs import fsync_folder
from .checkpoint import load_trainable_state, trainable_state


@dataclass
class EarlyStopping:
    """Stop after `patience` evaluations in a row without an improvement of at least `min_delta`.

    Called as fit's `on_eval(step, eval_loss)` hook; returns True to stop.
    """

    patience: int
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_at: int | None = None

    def state(self) -> dict:
        """What a checkpoint keeps, so a resumed run stops where the uninterrupted one would."""
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "stopped_at": self.stopped_at}

    def restore(self, state: dict) -> None:
        for key in ("best", "best_step", "bad_evals", "stopped_at"):
            if key in state:
                setattr(self, key, state[key])

    def __call__(self, step: int, value: float) -> bool:
        if self.best is None or value < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return False
        self.bad_evals += 1
        if self.patience and self.bad_evals >= self.patience:
            self.stopped_at = step
            return True
        return False


@dataclass
class BestWeights:
    """The trainable weights at the lowest eval loss so far: on disk when a run folder is given
    (so a resumed run still knows them), else in memory."""

    path: Path | None = None
    step: int | None = None
    value: float | None = None
    _memory: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def offer(self, model, step: int, value: float) -> bool:
        """Keep the model's weights if `value` is the best eval loss seen; True when kept. On disk the
        ones they replace stay as best-step-N until a checkpoint knows the new ones (`committed`):
        a crash before it resumes from a checkpoint whose best they are."""
        if self.value is not None and value >= self.value:
            return False
        previous, (self.step, self.value) = self.step, (step, value)
        weights = trainable_state(model)
        if self.path is None:
            self._memory = weights
        else:
            if previous is not None and self.path.exists():
                os.replace(self.path, self.kept(self.path, previous))
            tmp = self.path.with_name(self.path.name + ".tmp")
            save_file(weights, tmp, metadata={"step": str(step), "eval_loss": repr(value)})
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            tmp.replace(self.path)
            fsync_folder(self.path.parent)
        return True

    def restore(self, model) -> None:
        load_trainable_state(model, self._memory if self.path is None else load_file(self.path))

    def committed(self, still_needed: set[int] = frozenset()) -> None:
        """A checkpoint now records the best step: the best weights kept from before go, except those
        of `still_needed` steps (the best of an older checkpoint still kept: if the newest one will
        not read back, the resume falls back to it and needs its best weights)."""
        if self.path is not None:
            keep = {self.kept(self.path, step) for step in still_needed}
            for old in self.path.parent.glob(self.path.stem + "-step-*" + self.path.suffix):
                if old not in keep:
                    old.unlink(missing_ok=True)

    @staticmethod
    def kept(path: Path, step: int) -> Path:
        return path.with_name(f"{path.stem}-step-{step}{path.suffix}")

    @classmethod
    def reopen(cls, path: Path, step: int | None, value: float | None) -> "BestWeights":
        """After a resume: the best weights of the checkpoint's best step, from the file on disk or
        from the one kept when a better evaluation after the checkpoint replaced it (those belong
        to steps about to be redone)."""
        for found in ([path, cls.kept(path, step)] if step is not None else []):
            if found.exists() and _saved_step(found) == str(step):
                if found != path:
                    os.replace(found, path)
                return cls(path, step, value)
        return cls(path)


def run_best_weights(run_dir: Path | None, state, ranks) -> BestWeights:
    """The best weights of a run about to train. Rank 0 keeps them on disk, so a resumed run reopens
    them; the other ranks hold their replica's in memory and are told the resumed best by rank 0
    (a rank that did not know it skipped the restore at the end, and the ranks waited on each other's
    collectives for ever). Under FSDP2 each rank holds its own shards in memory, so a resumed run
    starts without the best weights of before."""
    if run_dir is None or ranks.fsdp:
        if ranks.fsdp and ranks.main and state.best_step is not None:
            say(f"the best weights of step {state.best_step} stay behind (FSDP2 keeps them in memory): "
                "the resumed run keeps its own best")
        return BestWeights()
    best = BestWeights.reopen(run_dir / "best.safetensors", state.best_step, state.best_eval) if ranks.main \
        else BestWeights()
    step, value = ranks.broadcast((best.step, best.value))
    if not ranks.main and step is not None:
        # Held in host memory, as trainable_state keeps them: a copy on the GPU is memory no plan counts.
        best = BestWeights(None, step, value, load_file(run_dir / "best.safetensors", device="cpu"))
    return best


def _saved_step(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return (handle.metadata() or {}).get("step")


def overfitting(train_losses: list[float], evals: list[tuple[int, float]], window: int = 3) -> bool:
    """True when the last `window` eval losses rose one after another while the mean training loss
    between those evaluations kept falling: the model is learning the training set by heart."""
    if len(evals) < window:
        return False
    recent = evals[-window:]
    if not all(later[1] > earlier[1] for earlier, later in zip(recent, recent[1:])):
        return False
    means = []
    for (start, _), (end, _) in zip(recent, recent[1:]):
        part = train_losses[start:end]  # losses[i] belongs to step i + 1: steps start+1 .. end
        if not part:
            return False
        means.append(sum(part) / len(part))
    return all(later < earlier for earlier, later in zip(means, means[1:]))


def return_best(model, best: BestWeights, validation, cfg, log, step: int, result,
                 evaluate, loss_module, select=None) -> None:
    """Put back the weights of the best evaluation when the last step's are worse."""
    best.committed()  # training is over: the best weights older checkpoints knew are not needed
    result.best_step = best.step
    if not (validation and evaluate and cfg.eval.restore_best and best.step is not None and best.step != step):
        return
    losses = dict(result.eval_losses)
    history = result.selected if select else result.eval_losses
    if history and history[-1][0] == step:
        final_loss, final = losses[step], history[-1][1]
    else:  # ranks evaluate together
        final_loss = evaluate(loss_module)
        final = select.key(select("generate (validation, last step)")) if select else final_loss
    result.final_eval = final_loss
    if final <= best.value:  # the last evaluation is the best (it is never offered to `best`): its step
        result.best_step = step
    if best.value < final:
        best.restore(model)
        # the kept weights' eval loss where this process measured it (a resumed run measures it again)
        result.restored_best, result.final_eval = True, losses.get(best.step, None if select else best.value)
        what = select.metric if select else "eval loss"
        log.write(event="restore_best", step=step, best_step=best.step, metric=what.replace(" ", "_"),
                  best=shown_key(select, best.value, digits=None), last=shown_key(select, final, digits=None),
                  **({} if select else {"eval_loss": best.value, "last_eval_loss": final}))
        say(f"restored the weights of step {best.step} ({what} {shown_key(select, best.value)}; "
            f"last step {shown_key(select, final)})")


def shown_key(select, key: float, digits: int | None = 4):
    """A minimised key as the figure it stands for: the eval loss, or eval.best_metric's value."""
    value = select.value(key) if select else key
    return value if digits is None else f"{value:.{digits}f}"
