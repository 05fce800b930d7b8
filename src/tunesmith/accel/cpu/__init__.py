"""CPU fast paths: the shared rewrites plus tunesmith's padding-free CPU attention
(batched matmuls in query blocks, and a native AVX512-BF16 kernel where it is faster)."""
from .. import lora_linear, rmsnorm, rotary, swiglu
from . import attention

REWRITES = (rmsnorm, swiglu, rotary, lora_linear, attention)
