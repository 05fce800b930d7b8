"""Peak training memory of one configuration, as a breakdown that sums to the total.

The activation terms count the tensors autograd keeps for the backward pass of a Llama-style
block as tunesmith runs it (transformers' SDPA attention, PEFT LoRA, the label-only chunked LM
head of training/loss.py); each term was checked against the saved tensors of a real forward.
Facts of the stack that matter:
- RMSNorm upcasts its input to fp32 and keeps that copy, whatever the compute dtype.
- A frozen linear layer keeps no input; a LoRA layer keeps its input in the adapter dtype. On a
  bf16/fp16 base (not QLoRA) training/loss.py runs the adapters under autocast, so inputs stay in
  the base dtype, shared by the adapters of a stage (fp32 adapter weights are cast once per step).
- For QLoRA, peft's prepare_model_for_kbit_training turns norms and embeddings to fp32, which
  makes the residual stream and thereby every activation fp32 (`upcast_extras`).
- Only label positions reach the LM head, but every label position's fp32 log-softmax is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .shapes import LINEARS, ModelShape

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit scale per 64 + fp32 scale per 256 scales
NF4_PLAIN_BYTES = 0.5 + 4 / 64  # without double quantisation: one fp32 scale per block of 64
HEAD_CHUNK = 2048  # label positions per LM-head chunk (training/loss.py CHUNK)
METHODS = ("full", "lora", "dora", "qlora")


@dataclass(frozen=True)
class Setup:
    method: str = "lora"
    dtype: str = "bfloat16"
    batch: int = 8
    seq: int = 512
    gradient_checkpointing: bool = False
    r: int = 16
    targets: tuple[str, ...] = LINEARS
    label_share: float = 1.0  # share of positions with a label; packed data or a worst case: 1
    adapter_dtype: str = "float32"  # PEFT keeps adapters in fp32 by default
    optimizer_bytes: float | None = None  # per trainable weight; None = AdamW's two states in the weight dtype
    upcast_extras: bool = True  # QLoRA: norms and embeddings in fp32 (peft's kbit preparation)
    double_quant: bool = True
    head_chunk: int = HEAD_CHUNK  # label positions per LM-head chunk
    logit_bytes: int = 4  # kept per vocabulary entry and label: fp32 log-softmax; 2 where a fused loss keeps 16-bit logits


@dataclass
class Estimate:
    setup: Setup
    shape: ModelShape
    parts: dict[str, float] = field(default_factory=dict)  # name -> bytes live at the peak; sums to total
    activations_no_ckpt: float = 0.0
    activations_ckpt: float = 0.0
    kept_logits: float = 0.0  # what the loss keeps for the backward pass
    trainable: int = 0
    peak_phase: str = ""

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def adapter_params(shape: ModelShape, setup: Setup) -> int:
    if setup.method == "full":
        return 0
    per_block = sum(setup.r * (i + o) + (o if setup.method == "dora" else 0)
                    for name, (i, o) in shape.linears().items() if name in setup.targets)
    return per_block * shape.layers


def weight_bytes(shape: ModelShape, setup: Setup) -> float:
    e = BYTES[setup.dtype]
    if setup.method != "qlora":
        return shape.total_params * e
    quantised = shape.layers * shape.block_linear_params
    extras = shape.total_params - quantised
    return quantised * (NF4_BYTES if setup.double_quant else NF4_PLAIN_BYTES) + extras * (4 if setup.upcast_extras else e)


STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def activation_bytes(shape: ModelShape, setup: Setup, first_block: bool = False) -> float:
    """Bytes per token that one block keeps for the backward pass.

    In the first block of an adapter run nothing before the first adapted layer needs a gradient,
    so autograd keeps only what follows it (`first_block`)."""
    e = 4 if setup.method == "qlora" and setup.upcast_extras else BYTES[setup.dtype]
    autocast = setup.method in ("lora", "dora") and BYTES[setup.dtype] == 2  # see training/loss.py
    a = e if autocast else BYTES[setup.adapter_dtype]
    full = setup.method == "full"
    h, i = shape.hidden, shape.intermediate
    norm = 4 * h + 4 + (e * h if full else 0)  # fp32 upcast + rsqrt (+ normalised input for the weight grad)
    # Per stage: (kept by the stage itself, input kept for the stage's adapters or weights).
    attention = e * (2 * shape.q_width + 2 * shape.kv_width) + 4 * shape.heads  # q, k, v, output, logsumexp
    stages = [(norm + attention, h), (0.0, shape.q_width), (norm + 3 * e * i, h), (0.0, i)]  # gate, SiLU, up
    skip = 0
    if first_block and not full:
        skip = next((n for n, names in enumerate(STAGES) if set(names) & set(setup.targets)), len(STAGES))
    total = 0.0
    for n, ((kept, width), names) in enumerate(zip(stages, STAGES)):
        hit = [name for name in names if full or name in setup.targets]
        if n < skip:
            continue
        if n > skip or not first_block or full:
            total += kept
        elif n == 0 or n == 2:  # the first adapted stage: its norm's input needs no gradient
            total += kept - norm
        if not hit:
            continue
        if full or a == e:
            # o_proj's input is a view of the attention output, kept already unless the attention is not.
            total += e * width if (n != 1 or (first_block and n == skip)) else 0.0
        else:  # each adapter casts its input to the adapter dtype and keeps the copy
            total += a * len(hit) * width
        total += sum(a * setup.r + (2 * a * shape.linears()[name][1] if setup.method == "dora" else 0)
                     for name in hit if not full)
    return total


def estimate(shape: ModelShape, setup: Setup, overhead: float = 0.0) -> Estimate:
    """Peak bytes of a training step (from the second step on, when optimizer states exist)."""
    e = BYTES[setup.dtype]
    act_e = 4 if setup.method == "qlora" and setup.upcast_extras else e
    tokens = setup.batch * setup.seq
    labels = tokens * setup.label_share
    full = setup.method == "full"

    n_adapter = adapter_params(shape, setup)
    trainable = shape.total_params if full else n_adapter
    grad_e = e if full else BYTES[setup.adapter_dtype]
    grads_layers = (shape.layers * shape.block_params if full else n_adapter) * grad_e
    grads_other = (shape.embedding_params + shape.hidden) * e if full else 0.0  # head/embeddings: first in backward
    states = trainable * (setup.optimizer_bytes if setup.optimizer_bytes is not None else 2 * grad_e)

    block = activation_bytes(shape, setup) * tokens
    first = activation_bytes(shape, setup, first_block=not setup.gradient_checkpointing) * tokens
    kept_layers = (shape.layers * act_e * shape.hidden * tokens if setup.gradient_checkpointing
                   else (shape.layers - 1) * block + first)
    final_norm = (4 * shape.hidden + 4 + (e * shape.hidden if full else 0)) * tokens
    rope = 2 * shape.head_dim * act_e * setup.seq
    head_input = e * shape.hidden * labels if full else 0.0
    kept_other = final_norm + rope + head_input + 9 * labels  # + targets and mask
    if setup.method in ("lora", "dora") and e == 2 and BYTES[setup.adapter_dtype] == 4:
        kept_other += n_adapter * e  # autocast's half copies of the fp32 adapter weights (training/loss.py)
    logits = kept_logits = setup.logit_bytes * shape.vocab * labels  # every label position's log-softmax
    chunk = min(setup.head_chunk, labels)
    # Backward runs the loss and LM head first (their logits are freed after), then one block at a
    # time: that block's activation gradients (and its recomputed activations under checkpointing).
    head_work = (act_e + 4) * shape.vocab * chunk
    block_work = block * (2 if setup.gradient_checkpointing else 1)
    if setup.method == "dora":  # the weight norm materialises one full weight (and its update) in fp32
        block_work += 3 * 4 * max(i * o for i, o in shape.linears().values())
    head_phase = grads_other + kept_layers + kept_other + logits + head_work
    # Blocks free their activations as they fill their gradients: the peak is at one end.
    blocks_phase = grads_other + max(kept_layers, grads_layers) + kept_other + block_work
    if head_phase >= blocks_phase:
        live_grads, live_acts, working, phase = grads_other, kept_layers + kept_other, head_work, "loss backward"
    else:
        logits = 0.0
        early = kept_layers >= grads_layers
        live_grads = grads_other + (0 if early else grads_layers)
        live_acts = kept_other + (kept_layers if early else 0)
        working, phase = block_work, "backward of the last block" if early else "backward of the first block"
    # Optimizer step: all gradients plus one temporary the size of the largest weight (AdamW's denominator).
    largest = max(shape.vocab * shape.hidden, max(i * o for i, o in shape.linears().values())) if full else 0
    step = grads_other + grads_layers + largest * grad_e
    if step > max(head_phase, blocks_phase):
        # (the forward's logits and activations are gone by then)
        live_grads, live_acts, logits, working = grads_other + grads_layers, 0.0, 0.0, largest * grad_e
        phase = "optimizer step"

    parts = {
        "weights": weight_bytes(shape, setup),
        "adapter weights": n_adapter * BYTES[setup.adapter_dtype],
        "gradients": live_grads,
        "optimizer states": states,
        "activations": live_acts,
        "logits and loss": logits,
        "working memory": working,
        "framework overhead": overhead,
    }
    return Estimate(setup=setup, shape=shape, parts=parts, trainable=trainable, peak_phase=phase,
                    activations_no_ckpt=(shape.layers - 1) * block + first + kept_other, kept_logits=kept_logits,
                    activations_ckpt=shape.layers * act_e * shape.hidden * tokens + block + kept_other)


def with_changes(setup: Setup, **changes) -> Setup:
    return replace(setup, **changes)
