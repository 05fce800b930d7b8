"""How long an epoch takes: FLOPs per token for the method, over the device's peak and a utilisation.

Training FLOPs per token: the forward is 2 FLOPs per weight of every matrix product; full
fine-tuning adds 2 for the input gradients and 2 for the weight gradients (6N); LoRA and QLoRA
skip the frozen weights' gradients (about 4N); gradient checkpointing runs the forward of the
checkpointed blocks twice; an objective with a reference (DPO, KTO) adds the reference's forward.
Attention adds its score and value products (causal: half of the square), and only label
positions pass through the LM head. MFU (model FLOPs utilisation, as PaLM defined it) counts the
model's FLOPs only: the recomputed forward of checkpointing is time spent, not model work, so
it is in the epoch time and not in the MFU.
"""
from __future__ import annotations

import json
import math
import os
import time

from .setup import Setup
from .shapes import ModelShape

GPU_UTILISATION = 0.4  # share of the dense peak a fine-tuning step typically reaches
# Share of the measured matmul peak tunesmith's LoRA steps on the default model reach on 2 cores:
# 51% on an AMD EPYC without AVX-512 (fp32, 2026-12-05), 53-58% on a Zen 4 (bf16,
# bench/train_speed.py). 20% until 2026-12-05: measured on an AMX host on 2026-11-26, before the
# CPU fast paths, it made the plan's epoch times 2.5x too long.
CPU_UTILISATION = 0.5


def flops_per_token(shape: ModelShape, setup: Setup, mean_seq: float | None = None, recompute: bool = True) -> float:
    """FLOPs a training step spends per token; recompute=False leaves out checkpointing's second
    forward (the count MFU divides by the peak)."""
    seq = mean_seq or setup.seq
    blocks = 2 * shape.layers * shape.block_linear_params
    attention = 2 * shape.layers * shape.q_width * seq  # QK^T and AV, 2 FLOPs each, causal half
    head = 2 * shape.vocab * shape.hidden * setup.label_share
    from .setup import _method, checkpointed_layers

    full = _method(setup).trains_all_weights
    backward_weights = 3 if full else 2  # input grads (+ weight grads for full fine-tuning)
    adapters = 0.0
    if not full:
        adapter_weights = sum(setup.r * (i + o) for n, (i, o) in shape.linears().items() if n in setup.targets)
        adapters = 6 * shape.layers * adapter_weights
    again = checkpointed_layers(shape, setup) / shape.layers if recompute else 0.0  # the checkpointed blocks' share
    forward_again = (blocks + attention) * again
    # DPO, KTO (GRPO with a KL term): the reference's forward of every sequence, in each step or once
    # before training (train.precompute_ref: the same work for one epoch)
    reference = blocks + head + attention if setup.reference_forward else 0.0
    return backward_weights * (blocks + head) + 3 * attention + adapters + forward_again + reference


def epoch_seconds(tokens: int, shape: ModelShape, setup: Setup, peak_flops: float, utilisation: float,
                  mean_seq: float | None = None) -> float:
    return tokens * flops_per_token(shape, setup, mean_seq) / (peak_flops * utilisation)


# Other work on the machine slows a measurement of the peak: one taken while the load per CPU is
# this much lower than at the last one is taken again (the fastest seen is kept).
QUIETER = 0.25


def matmul_peak(dtype: str = "bfloat16") -> float:
    """Measured matrix-multiply FLOP/s of this machine (torch.matmul), cached per dtype and thread count.

    A figure measured while other processes ran under-states the peak (one measured on this
    busy machine read 72 GFLOP/s in fp32 against 180 on the quiet machine, and every MFU read above
    100%): the cache keeps the fastest measurement with the load it was taken at, and measures
    again whenever the machine is quieter than that."""
    import torch

    from ..models.default import cache_dir

    path = cache_dir() / "plan" / "matmul_peak.json"
    key = f"{dtype}-{torch.__version__}-{torch.get_num_threads()}threads-warm"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key)
    if not isinstance(entry, dict):  # none yet, or a bare figure from before the load was kept
        entry = {"flops": float(entry or 0.0), "load": math.inf}
    load = load_per_cpu()
    if not entry["flops"] or load <= entry["load"] - QUIETER:
        cached[key] = {"flops": max(entry["flops"], _measure_matmul(getattr(torch, dtype))), "load": round(load, 2)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
        entry = cached[key]
    return entry["flops"]


def load_per_cpu() -> float:
    """The last minute's load average over the CPUs (0 where the system does not say)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def _measure_matmul(dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """The fastest of `seconds` of size x size products, after as long untimed: the fastest run is
    the one least slowed by whatever else runs meanwhile."""
    import torch

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    # Warm-up, untimed: kernel choice, weight packing, and on CPUs with AMX the first second of
    # bf16 matmuls, which runs at about a third of the speed reached after it.
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
    fastest, until = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < until:
        began = time.perf_counter()
        torch.matmul(a, b)
        fastest = min(fastest, time.perf_counter() - began)
    return 2 * size**3 / fastest
