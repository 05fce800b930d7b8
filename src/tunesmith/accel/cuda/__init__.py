"""CUDA fast paths: the shared rewrites (compiled with torch.compile's GPU backend) plus
padding-free variable-length flash attention. On by default in the one GPU run so far (the
Llama-3.1-8B shape on one H200: bench/gpu_runs/2026-12-04-h200.md); their bf16 comparison with
fast_paths=off (tests/test_accel.py) has not yet passed on a GPU."""
from .. import lora_linear, rmsnorm, rotary, swiglu
from . import attention

REWRITES = (rmsnorm, swiglu, rotary, lora_linear, attention)
