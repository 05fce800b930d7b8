"""The end of an FSDP2 run on rank 0: the trained weights are written first, from the gathered
state on a skeleton of the model (its modules without weights, on the meta device), so that they
are saved however large the base is; the whole model is then loaded for scoring only where it fits
on rank 0's device, beside the other ranks' shards. The base was loaded whole again before anything
was saved: by reading, a device without room for it beside the shards would have lost the trained
weights (not run on GPUs)."""
from __future__ import annotations

import gc
from pathlib import Path

import torch

from safetensors.torch import save_file

from ..errors import UserError
from ..methods.common import model_bytes, save_trained
from ..progress import say
from .checkpoint import load_trainable_state

# Of the device's free memory, what the whole model may take: generation's cache and activations
# need the rest.
SCORING_SHARE = 0.8
KEPT = "gathered_state.safetensors"  # where the weights go if no model folder could be written


def finish(state: dict, cfg, method, dtype: torch.dtype, device: torch.device, tokenizer, folder: Path,
           free: int | None = None, wanted: bool = True):
    """Writes the trained weights to `folder`; returns (the whole trained model on `device` for
    scoring, None) or, where it would not fit there, (None, why: said, with how to score it elsewhere).
    `free`: the device's free bytes (measured where not given); not `wanted`: nothing to score, (None, None)."""
    try:
        skeleton = _skeleton(cfg, method, dtype)
        _assign(skeleton, state)
        save_trained(skeleton, tokenizer, folder)
    except Exception as err:  # noqa: BLE001 (whatever the model's shape did: the trained weights are kept)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: value.contiguous() for name, value in state.items()}, folder / KEPT)
        raise UserError(f"the trained weights could not be written as a model folder ({type(err).__name__}: {err}); "
                        f"they are kept, under their parameter names, in {folder / KEPT}") from err
    need = model_bytes(skeleton)
    del skeleton
    if not wanted:
        return None, None
    why = no_room(need, free_bytes(device) if free is None else free, device)
    if why:
        say(f"the fine-tuned model is not scored here: {why}; its trained weights are in {folder} (score it with "
            "`tunesmith eval` on a device where it fits)")
        return None, why
    model = method.load_base(cfg.model.name, dtype, device, cfg.model.trust_remote_code)
    model = method.make_trainable(model, cfg.adapter)
    load_trainable_state(model, state)
    return model, None


def no_room(need: int, free: int, device: torch.device) -> str | None:
    """Why a whole model of `need` bytes is not loaded for scoring where `free` bytes are free, or None:
    generation's cache and activations need the rest."""
    if need <= SCORING_SHARE * free:
        return None
    return (f"whole, it takes {need / 2**30:.1f} GiB, more than {SCORING_SHARE:.0%} of the {free / 2**30:.1f} GiB "
            f"free on {device}")


def collect_garbage(device: torch.device) -> None:
    """Free what dropped models left: they hold reference cycles, so their weights outlive `del`
    until a collection; on a GPU the freed blocks go back to the driver too."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> int:
    """Memory free for the whole model on `device`: on a GPU what the driver reports free, with what
    torch holds cached but unused; on the CPU the machine's available memory."""
    collect_garbage(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _skeleton(cfg, method, dtype: torch.dtype):
    """The model as trained (adapters on the base; a full fine-tune in the trained weights' dtype),
    without weights."""
    from ..models.load import load_skeleton

    model = load_skeleton(cfg.model.name, dtype, cfg.model.trust_remote_code)
    # A full fine-tune's gathered state holds every weight: the base's modules take them as they are.
    return model if method.trains_all_weights else method.make_trainable(model, cfg.adapter)


def _assign(model, state: dict) -> None:
    """The gathered tensors become the skeleton's parameters (tied weights tied again)."""
    unknown = set(state) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise RuntimeError(f"gathered weights the model does not have: {sorted(unknown)[:3]}")
    for name, value in state.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, leaf)
        setattr(module, leaf, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
