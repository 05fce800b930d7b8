"""Resumable training state, saved as one unit and atomically.

A checkpoint folder holds the trainable weights (safetensors), the optimizer and scheduler
state (torch.save, read back with weights_only=True onto the run's device), and state.json:
step, data position, RNG states (the CPU's and, on CUDA, the device's), best eval, early
stopping, config hash. It is written under a temporary name, fsynced, renamed when whole and the
rename made durable, so a crash at any moment leaves a complete newest checkpoint; older ones
are removed only once the new one is in place.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import device as devices
from ..setting_keys import PATH_SETTINGS, result_keys
from ..errors import UserError
from ..runs import CHECKPOINT_PREFIX as PREFIX
from ..runs import PARTIAL, checkpoint_folders, fsync_folder

SHARDED = "sharded"  # torch.distributed.checkpoint folder of an FSDP2 run


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # position in the (seeded, deterministic) stream of micro-batches
    train_tokens: int = 0
    best_eval: float | None = None
    best_step: int | None = None
    config_hash: str = ""
    losses: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    early_stopping: dict = field(default_factory=dict)  # EarlyStopping's state (training/early_stop.py)
    train_seconds: float = 0.0  # training time of the steps done, over every process that trained them


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trained weights, copied to host memory (under FSDP2 this rank's shards: a DTensor's local
    part). Not cloned on the device: on a GPU a full fine-tune's copy, which no plan counts, came on
    top of the training peak at each checkpoint, and stayed there where another rank keeps the best
    weights in memory; safetensors copies them to the host to write them anyway."""
    return {name: _local(p).detach().to("cpu", copy=True).contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def load_trainable_state(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())  # copy_ moves each tensor to its parameter's device
    missing = [name for name in tensors if name not in params]
    if missing:
        raise UserError(f"checkpoint does not match the model: unknown weights {missing[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            _local(params[name]).copy_(value)


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict, torch_states: dict, device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    devices.set_rng_states(torch_states, device)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir():
            _fsync_tree(path)
            continue
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def config_hash(settings: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def same_setting(key: str, saved, now) -> bool:
    if saved == now:
        return True
    # a checkpoint from before runs recorded local paths absolute (start.anchored) holds them as typed,
    # relative to the folder training started in, where a resume is run from too
    if key not in PATH_SETTINGS or not isinstance(saved, str) or not isinstance(now, str):
        return False
    return Path(saved).expanduser().resolve() == Path(now) and Path(now).exists()


# A run's length: changed to end the run at its checkpoint's own step (nothing more is trained)
LENGTH_SETTINGS = ("train.max_steps", "train.epochs")


# The training examples as tokens (count and digest), kept with the settings: a checkpoint records
# where in its shuffled epoch the run stood, which means nothing over other examples.
DATA_KEY = "data.trained_examples"


def trained_examples(split) -> str:
    """'<count> examples, <digest>' of a split's token ids, labels and KTO marks."""
    import hashlib

    digest = hashlib.sha256()
    for example in split.encoded:
        digest.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(example.labels, dtype=np.int64).tobytes())
        digest.update(repr(getattr(example, "desirable", None)).encode())
    return f"{len(split.encoded)} examples, {digest.hexdigest()[:12]}"


def resume_settings(cfg, train) -> dict:
    """What a checkpoint must have been trained with to be resumed: the settings that change the
    result, and the examples trained on (`check_same_settings` compares them)."""
    return {**result_keys(cfg), DATA_KEY: trained_examples(train)}


def check_same_settings(path: Path, settings: dict, steps: int | None = None) -> None:
    """Refuse to resume when a setting that changes the result, or the training examples, differ
    from the checkpoint's; a run's length may change where the run now ends at the checkpoint's
    step (`steps`: its total)."""
    meta = json.loads((path / "state.json").read_text())
    saved = meta.get("settings", {})
    if DATA_KEY in saved and saved[DATA_KEY] != settings.get(DATA_KEY):
        raise UserError(f"{path}: the training data changed since this checkpoint ({saved[DATA_KEY]} then, "
                        f"{settings.get(DATA_KEY)} now): the run would go on over other examples than it started "
                        "with; restore the data, or use a new output.dir (or output.overwrite=true) to start over")
    settings = {k: v for k, v in settings.items() if k != DATA_KEY}
    saved = {k: v for k, v in saved.items() if k != DATA_KEY}
    differing = sorted(k for k in set(saved) | set(settings) if not same_setting(k, saved.get(k), settings.get(k)))
    if steps == meta["step"]:
        differing = [k for k in differing if k not in LENGTH_SETTINGS]
    elif differing and set(differing) <= set(LENGTH_SETTINGS) and steps is not None and steps < meta["step"]:
        raise UserError(f"{path}: this checkpoint is at step {meta['step']}, past the {steps} steps the config now "
                        f"asks for; train.max_steps={meta['step']} ends the run at it")
    if differing:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {settings.get(k)!r})" for k in differing)
        raise UserError(f"{path}: the config changed since this checkpoint, in {shown}; restore those settings, "
                        "or use a new output.dir (or output.overwrite=true) to start over")


RANK_RNG = "rng-ranks.pt"  # every rank's random state, under several ranks


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: TrainState, keep: int,
                    settings: dict | None = None, ranks=None) -> Path:
    """Write checkpoints/step-N atomically and keep only the newest `keep`.

    Replicated ranks (DDP) hold the same weights, so rank 0 writes alone; sharded ranks (FSDP2)
    each write their shard through torch.distributed.checkpoint, and rank 0 renames when all are done."""
    main = ranks is None or ranks.main
    sharded = ranks is not None and ranks.fsdp
    final = folder / f"{PREFIX}{state.step:08d}"
    tmp = folder / (final.name + PARTIAL)
    if final.is_dir() and (final / "state.json").is_file():
        # This step's state is saved already (a resumed run stopping where it resumed): training
        # is deterministic, so it is the same state; never delete it to write it again.
        return final
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if ranks is not None:
        ranks.barrier()
    # Each rank's random state: ranks draw dropout masks for other examples, so theirs part ways.
    # The device's is where it computes (shards offloaded to host memory draw on the run's device).
    device_rng = devices.rng_states(devices.compute_device(model))
    own_rng = {"rng": rng_state(), **device_rng}
    every_rng = ranks.gather(own_rng) if ranks is not None else [own_rng]
    try:
        if sharded:
            _save_sharded(tmp / SHARDED, model, optimizer)
        if main:
            if not sharded:
                save_file(trainable_state(model), tmp / "trainable.safetensors")
            extra = {} if sharded else {"optimizer": optimizer.state_dict()}
            torch.save({**extra, "scheduler": scheduler.state_dict(), **device_rng}, tmp / "optim.pt")
            if len(every_rng) > 1:
                torch.save(every_rng, tmp / RANK_RNG)
            (tmp / "state.json").write_text(json.dumps({**asdict(state), "rng": rng_state(), "settings": settings or {},
                                                        "sharded": sharded}))
            _fsync_tree(tmp)
            tmp.rename(final)
            fsync_folder(folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(folder)
        kept = f"; the previous checkpoint {previous[-1].name} is intact" if previous else ""
        reason = "the disk is full" if err.errno == errno.ENOSPC else str(err)
        raise UserError(f"{folder}: could not save checkpoint {final.name}: {reason}{kept}") from None
    if main:
        for old in complete_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if ranks is not None:
        ranks.barrier()
    return final


def _sharded_options():
    """Keys of the model itself (not of a wrapper: a checkpoint resumes under any number of ranks, one
    too), and the trained weights only: an adapter run's frozen base is the base model's, as loaded
    (saved with it, a 70B base went into every checkpoint)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _save_sharded(path: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_sharded_options())
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def _load_sharded(path: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = _sharded_options()
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    wanted = {"model": model_state, "optimizer": optim_state}
    dcp.load(wanted, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=wanted["model"], optim_state_dict=wanted["optimizer"],
                   options=options)


def complete_checkpoints(folder: Path) -> list[Path]:
    return checkpoint_folders(folder, complete=True)


def partial_checkpoints(folder: Path) -> list[Path]:
    return checkpoint_folders(folder, complete=False)


def best_steps(folder: Path) -> set[int]:
    """The best evaluation's step of each complete checkpoint (those unreadable or without one left out)."""
    steps = set()
    for path in complete_checkpoints(folder):
        try:
            step = json.loads((path / "state.json").read_text()).get("best_step")
        except (OSError, ValueError):
            continue
        if isinstance(step, int):
            steps.add(step)
    return steps


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG (this rank's, where every rank's was saved) onto
    the model's device; returns the saved TrainState."""
    device = next(model.parameters()).device
    meta = json.loads((path / "state.json").read_text())
    saved = torch.load(path / "optim.pt", weights_only=True, map_location=device)
    if meta.pop("sharded", False):
        _load_sharded(path / SHARDED, model, optimizer)
    else:
        load_trainable_state(model, load_file(path / "trainable.safetensors", device=str(device)))
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    computes = devices.compute_device(model)
    set_rng_state(meta.pop("rng"), saved, computes)
    every = torch.load(path / RANK_RNG, weights_only=True, map_location="cpu") if (path / RANK_RNG).is_file() else []
    if 0 < rank < len(every):  # a rank the checkpoint did not know (more ranks now) goes on from rank 0's
        set_rng_state(every[rank]["rng"], every[rank], computes)
    meta.pop("settings", None)
    return TrainState(**meta)


def newest_usable(folder: Path, say) -> Path | None:
    """The newest complete checkpoint that reads back; partial or damaged ones are named and skipped."""
    for partial in partial_checkpoints(folder):
        say(f"ignoring partial checkpoint {partial} (the run stopped while writing it)")
    for candidate in reversed(complete_checkpoints(folder)):
        err = damage(candidate)
        if err is None:
            return candidate
        say(f"skipping damaged checkpoint {candidate.name}{_set_aside(candidate, err)}: "
            f"{type(err).__name__}: {str(err)[:120]}")
    return None


def damage(checkpoint: Path, thorough: bool = True) -> Exception | None:
    """Why a complete checkpoint does not read back (None: it does). `thorough=False`: its files'
    structure only (headers, the zip's directory), memory-mapped, not read into memory: a cheap
    look for every rank before anything loads; want of memory or a storage hiccup is no damage then."""
    from safetensors import safe_open

    try:
        meta = json.loads((checkpoint / "state.json").read_text())
        if meta.get("sharded"):
            if not (checkpoint / SHARDED / ".metadata").exists():
                raise FileNotFoundError(f"{SHARDED}/.metadata missing")
        elif thorough:
            load_file(checkpoint / "trainable.safetensors")
        else:
            with safe_open(str(checkpoint / "trainable.safetensors"), "pt"):
                pass
        torch.load(checkpoint / "optim.pt", weights_only=True, map_location="cpu", mmap=not thorough)
        return None
    except (MemoryError, OSError) as err:
        return err if thorough or isinstance(err, FileNotFoundError) else None
    except Exception as err:  # a damaged checkpoint of any kind is skipped, not fatal
        return err


def _set_aside(checkpoint: Path, err: Exception) -> str:
    """Move a checkpoint whose content is damaged aside (not deleted: it is the user's), so that the
    resumed run saves that step again; one that failed for want of memory or a storage hiccup stays."""
    if isinstance(err, MemoryError) or (isinstance(err, OSError) and not isinstance(err, FileNotFoundError)):
        return ""
    aside = checkpoint.with_name(f"damaged-{checkpoint.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        checkpoint.rename(aside)
    except OSError:
        return ""
    return f" (moved to {aside.name})"
