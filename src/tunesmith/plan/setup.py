"""What a plan is of: one training configuration (`Setup`), and the facts of it that every estimate
reads (the method's record, the bytes of each dtype it names, the blocks that recompute).
plan/setups.py builds a Setup from a run config; plan/memory.py and plan/speed.py estimate it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .shapes import LINEARS, ModelShape

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Setup:
    method: str = "lora"
    dtype: str = "bfloat16"
    # model.dtype: auto, planned before the device is known (`tunesmith plan`, choose): each device
    # row in its own choice (Device.auto_dtype), `dtype` where no device is named
    dtype_auto: bool = False
    batch: int = 8
    seq: int = 512
    gradient_checkpointing: bool = False
    checkpoint_layers: int | None = None  # with gradient_checkpointing: the first k blocks; None = every block
    # adapter.gradient_checkpointing: auto: a plan checkpoints the fewest first blocks that fit each device
    # (plan/__init__.py); `estimate` takes the setup as it is
    checkpointing_auto: bool = False
    r: int = 16
    targets: tuple[str, ...] = LINEARS
    label_share: float = 1.0  # share of positions with a label; packed data or a worst case: 1
    adapter_dtype: str = "float32"  # PEFT keeps adapters in fp32 by default
    optimizer_bytes: float | None = None  # per trainable weight; None = AdamW's two states in the weight dtype
    upcast_extras: bool = False  # QLoRA: norms, embeddings and head in fp32 (peft's kbit preparation; not tunesmith's)
    double_quant: bool = True
    freeze_embeddings: bool = False  # full fine-tuning: token embeddings (and a tied head) frozen
    head_chunk: int | None = None  # label positions per LM-head chunk; None: training/loss.py's head_chunk
    # Per vocabulary entry and label, what the loss keeps for the backward pass: 0 for tunesmith's
    # loss (gradients computed in the forward); 2 for a loss that keeps bf16 logits (torchtune's).
    kept_logit_bytes: int = 0
    # accel/cpu/attention.py (tunesmith on a CPU): attention from batched matmuls, which holds one
    # layer's full score matrices while it runs; GPUs run SDPA's flash kernels, which do not.
    cpu_attention: bool = False
    # data.packing: micro-batches of packed rows (a padded batch); otherwise, with cpu_attention,
    # padding-free rows whose sequences attend one at a time
    packed_rows: bool = False
    # accel/cpu/native.py: a padding-free row's bf16 attention by the C kernel, which keeps no
    # score matrix and no mask (its work space, a few MiB per thread, is in the runtime term)
    native_attention: bool = False
    # Tokens of the largest micro-batch where it is known (a run's real data, padding-free rows);
    # None: batch x seq, the worst case. `seq` is then the longest sequence in it.
    tokens: int | None = None
    # Objectives (issue 23, plan/objectives.py): `batch` counts sequences (a pair is two, a GRPO
    # prompt group_size); a full fine-tune whose objective compares with a reference keeps a frozen
    # copy of the weights; GRPO samples with a KV cache of `sampled_tokens` tokens before each step.
    objective: str = "sft"
    reference_copy: bool = False
    reference_forward: bool = False  # the reference's forward without gradients (time, not memory)
    sampled_tokens: int = 0
    # Micro-batches per optimizer step (train.grad_accum): from the second on, every trainable
    # weight's gradient is held through the whole forward and backward (a full fine-tune's: the size of
    # its weights in fp32).
    grad_accum: int = 1
    # adapter.offload_activations (training/offload.py), on a GPU with checkpointing: the blocks'
    # inputs wait in host memory; one block's is back on the device while its backward runs
    offload_activations: bool = False
    # Devices the run spreads over (torchrun), and train.fsdp: FSDP2 shards over them (plan/sharding.py)
    devices: int = 1
    fsdp: bool = False


def _method(setup: Setup):
    """The methods registry's record of the setup's method (what the plan needs to know of it)."""
    from ..methods import get

    return get(setup.method)


def checkpointed_layers(shape: ModelShape, setup: Setup) -> int:
    """How many blocks (the first ones) recompute their forward in the backward pass."""
    if not setup.gradient_checkpointing:
        return 0
    return shape.layers if setup.checkpoint_layers is None else max(0, min(setup.checkpoint_layers, shape.layers))
