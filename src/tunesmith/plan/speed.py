"""How long an epoch takes: FLOPs per token for the method, over the device's peak and a utilisation.

Training FLOPs per token: the forward is 2 FLOPs per weight of every matrix product; full
fine-tuning adds 2 for the input gradients and 2 for the weight gradients (6N); LoRA and QLoRA
skip the frozen weights' gradients (about 4N); gradient checkpointing runs the forward of the
checkpointed blocks twice.
Attention adds its score and value products (causal: half of the square), and only label
positions pass through the LM head. MFU (model FLOPs utilisation, as PaLM defined it) counts the
model's FLOPs only: the recomputed forward of checkpointing is time spent, not model work, so
it is in the epoch time and not in the MFU.
"""
from __future__ import annotations

import json
import os
import time

from .memory import Setup
from .shapes import ModelShape

GPU_UTILISATION = 0.4  # share of the dense peak a fine-tuning step typically reaches
# Share of the measured matmul peak: tunesmith's LoRA steps on the default model reached 20% of it
# in bench/train_speed.py (2-core CPU, bf16); smaller matrices than a GPU's, so a lower share.
CPU_UTILISATION = 0.2


def flops_per_token(shape: ModelShape, setup: Setup, mean_seq: float | None = None, recompute: bool = True) -> float:
    """FLOPs a training step spends per token; recompute=False leaves out checkpointing's second
    forward (the count MFU divides by the peak)."""
    seq = mean_seq or setup.seq
    blocks = 2 * shape.layers * shape.block_linear_params
    attention = 2 * shape.layers * shape.q_width * seq  # QK^T and AV, 2 FLOPs each, causal half
    head = 2 * shape.vocab * shape.hidden * setup.label_share
    from .memory import _method, checkpointed_layers

    full = _method(setup).trains_all_weights
    backward_weights = 3 if full else 2  # input grads (+ weight grads for full fine-tuning)
    adapters = 0.0
    if not full:
        adapter_weights = sum(setup.r * (i + o) for n, (i, o) in shape.linears().items() if n in setup.targets)
        adapters = 6 * shape.layers * adapter_weights
    again = checkpointed_layers(shape, setup) / shape.layers if recompute else 0.0  # the checkpointed blocks' share
    forward_again = (blocks + attention) * again
    return backward_weights * (blocks + head) + 3 * attention + adapters + forward_again


def epoch_seconds(tokens: int, shape: ModelShape, setup: Setup, peak_flops: float, utilisation: float,
                  mean_seq: float | None = None) -> float:
    return tokens * flops_per_token(shape, setup, mean_seq) / (peak_flops * utilisation)


def matmul_peak(dtype: str = "bfloat16") -> float:
    """Measured matrix-multiply FLOP/s of this machine (torch.matmul), cached per dtype and thread count."""
    import torch

    from ..models.default import cache_dir

    path = cache_dir() / "plan" / "matmul_peak.json"
    key = f"{dtype}-{torch.__version__}-{torch.get_num_threads()}threads-warm"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = _measure_matmul(getattr(torch, dtype))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    return cached[key]


def _measure_matmul(dtype, size: int = 1024, seconds: float = 1.0) -> float:
    import torch

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    # Warm-up, untimed: kernel choice, weight packing, and on CPUs with AMX the first second of
    # bf16 matmuls, which runs at about a third of the speed reached after it.
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start)
