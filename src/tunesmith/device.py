"""The one device a run computes on, decided once at its start: `train.device`.

auto = cuda:LOCAL_RANK where CUDA is available (one process per GPU under torchrun), else the
CPU. Everything that touches tensors of a run (loading, batches, eval loss, generation, merges,
checkpoints) takes the device from here, so no part of a run silently computes elsewhere.
"""
from __future__ import annotations

import os

import torch

from .errors import UserError


def compute_device(module) -> torch.device:
    """Where a model (or its loss module) computes: its parameters' device, but for FSDP2 shards
    offloaded to host memory (train.fsdp_offload) the run's device, recorded when it was sharded."""
    return getattr(module, "_tunesmith_device", None) or next(module.parameters()).device


def resolve(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """torch.device for 'auto', 'cpu', 'cuda' (cuda:LOCAL_RANK) or 'cuda:N'; a device that is not
    there is a UserError."""
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if spec != "cuda" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise UserError(f"train.device={spec}: would put every rank of this machine on one GPU; use auto or "
                            "cuda (each rank on cuda:LOCAL_RANK) and pick the GPUs with CUDA_VISIBLE_DEVICES")
        if not torch.cuda.is_available():
            raise UserError(f"train.device={spec}: this machine has no CUDA device (torch {torch.__version__}); "
                            "use train.device=cpu or auto")
        index = rank if spec == "cuda" else _index(spec)
        if index >= torch.cuda.device_count():
            raise UserError(f"train.device={spec}: there are only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise UserError(f"train.device={spec}: expected auto, cpu, cuda or cuda:N")


def _index(spec: str) -> int:
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise UserError(f"train.device={spec}: expected cuda:N with N a number") from None


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 matmuls pay on CUDA devices with bf16 tensor cores (compute capability 8.0 and up:
    Ampere, Hopper, ...) and on CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """model.dtype: 'auto' is bf16 where the run's device multiplies it fast, else fp32."""
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device or resolve("auto")) else torch.float32
    return getattr(torch, name)


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch on the run's device. On CUDA the host tensors are pinned and copied
    asynchronously (the copy overlaps the work already queued); host-side values stay as they are."""
    if device.type == "cpu":
        return batch
    from .accel.rows import remember_bounds

    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            host, value = value, value.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else value.to(device)
            if key == "cu_seq_lens":  # the attention reads the bounds from the host copy
                remember_bounds(value, host)
        moved[key] = value
    return moved


def host_floats(*values) -> list[float]:
    """Python floats of numbers and device scalars; the tensors are read together (one host
    synchronisation for all of them)."""
    tensors = [v.detach().float().reshape(()) for v in values if isinstance(v, torch.Tensor)]
    read = iter(torch.stack([t.to(tensors[0].device) for t in tensors]).tolist() if tensors else [])
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """One line for the start of a run."""
    name = str(dtype).replace("torch.", "")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"device: {device} ({props.name}, {props.total_memory / 2**30:.0f} GiB), {name}"
    return f"device: cpu ({torch.get_num_threads()} threads), {name}"


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states a resumed run needs: the CPU's and, on CUDA, the device's."""
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch_rng"].cpu())
    if device.type == "cuda" and "cuda_rng" in states:
        torch.cuda.set_rng_state(states["cuda_rng"].cpu(), device)
