"""CUDA fast paths: the shared rewrites (compiled with torch.compile's GPU backend) plus
padding-free variable-length flash attention. Untested on a GPU so far: bench/gpu_check.sh
compares them with fast_paths=off there."""
from .. import lora_linear, rmsnorm, rotary, swiglu
from . import attention

REWRITES = (rmsnorm, swiglu, rotary, lora_linear, attention)
