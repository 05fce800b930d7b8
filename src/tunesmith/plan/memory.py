"""Peak training memory of one configuration, as a breakdown that sums to the total.

The activation terms count the tensors autograd keeps for the backward pass of a Llama-style
block as tunesmith runs it (transformers' SDPA attention, PEFT LoRA, the RMSNorm and SwiGLU of
accel/rmsnorm.py and accel/swiglu.py, the label-only LM head of training/loss.py); each term was checked against
the saved tensors of a real forward (tests/test_plan.py). Facts of the stack that matter:
- Three dtypes (`Dtypes`): the residual stream (norm inputs and outputs, rotary tables, the final
  hidden states), the linear layers' outputs (attention and MLP tensors), and the matmul inputs
  that trainable weights or adapters keep. They differ in two cases. A full fine-tune of a
  bf16/fp16 model trains fp32 master weights under bf16 autocast (methods/common.py): residual
  fp32, linear outputs bf16, and each linear layer fed by a norm keeps its own bf16 cast of its
  fp32 input (q, k and v: three copies). QLoRA keeps norms, embeddings and the head in the
  compute dtype (methods/qlora.py); with peft's prepare_model_for_kbit_training they would be
  fp32, and since bitsandbytes returns its output in its input's dtype, so would everything
  (`upcast_extras`, kept for that comparison).
- RMSNorm keeps its input in its own dtype plus one fp32 rstd per row; SwiGLU keeps gate and up
  (SiLU is recomputed); silu(gate) * up is down_proj's input, kept by down_proj's weight gradient
  or LoRA. A frozen linear layer keeps nothing (NF4 ones included).
- A LoRA layer keeps its input in the adapter's matmul dtype and its rank-r intermediate. On a
  bf16/fp16 base (not QLoRA) training/loss.py runs the adapters under autocast, so the inputs stay
  in the base dtype, shared by the adapters of a stage. Plain LoRA layers (accel/lora_linear.py)
  keep no cast of their fp32 adapter weights; DoRA's, under autocast, one half copy of each. Under
  a full fine-tune's autocast, autocast keeps a bf16 copy of every block weight.
- The LM head (training/loss.py): only label positions go through it, in chunks of
  2**24 / vocab rows, and each chunk's gradient is computed in the forward pass. Kept for the
  backward: the gradient of the label hidden states (residual dtype) and, when the head trains,
  an fp32 gradient of its weight. No logits are kept; a chunk's working memory (fp32 logits and
  the log-sum-exp's temporary; the softmax, its low-precision copy and the weight gradient's
  product) is live at the end of the forward, with every block's activations, plus the previous
  chunk's softmax (still named by the loop). The head multiplies in the hidden states' dtype:
  fp32 in a full fine-tune, whose autocast covers the decoder only.
- The embedding keeps its int64 token ids when it trains; the loss keeps a one-byte label mask.
- Gradient checkpointing (non-reentrant) keeps each checkpointed block's input; one block is
  recomputed at a time in the backward. Partial checkpointing (`checkpoint_layers`, the first k
  blocks, training/checkpointing.py) keeps the other blocks' activations whole.
- Training and scoring forwards pass use_cache=False (training/loss.py): no KV cache.
- On a CPU, accel/cpu/attention.py computes attention from batched matmuls (`cpu_attention`): it
  keeps what a flash kernel keeps plus one shared seq x seq fp32 mask bias, and while one layer runs
  it holds that layer's score matrices (in a padding-free row one block of about 224 queries of
  one sequence against that sequence's keys at a time, the whole batch's for packed rows): 8 bytes per score in the forward (scores and
  probabilities, or in bf16 scores, an fp32 buffer and probabilities), 3 in the attention's dtype
  in the backward (recomputed probabilities, their gradient, the scores' gradient).
Checked against torch.profiler's live-tensor peaks of real steps (tiny and default models, every
method, fp32 and bf16, with and without checkpointing): within 1-4%.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .setup import BYTES, Setup, _method, checkpointed_layers
from .shapes import ModelShape

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit scale per 64 + fp32 scale per 256 scales
NF4_PLAIN_BYTES = 0.5 + 4 / 64  # without double quantisation: one fp32 scale per block of 64
CHUNK_ELEMENTS = 2**24  # logits per LM-head chunk (training/loss.py CHUNK_ELEMENTS)
BLOCK_ROWS = 224  # query rows per block of a padding-free row's attention (accel/cpu/attention.py BLOCK_ROWS)


@dataclass(frozen=True)
class Dtypes:
    """Bytes per value of the three kinds of activation (see the module docstring)."""
    residual: int  # residual stream, norms, rotary tables, final hidden states
    inner: int  # linear layers' outputs: q, k, v, attention output, gate, up, silu(gate) * up
    matmul: int  # inputs kept by trainable matmuls (weights or adapters)
    head: int  # the LM head's matmul
    master: int  # trainable weights, their gradients and AdamW states (full fine-tuning)


def dtypes(setup: Setup) -> Dtypes:
    e = BYTES[setup.dtype]
    if _method(setup).trains_all_weights:
        # bf16/fp16 models train fp32 master weights under autocast in the low dtype.
        return Dtypes(residual=4, inner=e, matmul=e, head=4, master=4)
    if _method(setup).quantized_base and setup.upcast_extras:
        return Dtypes(residual=4, inner=4, matmul=BYTES[setup.adapter_dtype], head=4, master=4)
    # Adapters on a half-precision base run under autocast (training/loss.py half_precision_adapters).
    adapters = e if e == 2 else BYTES[setup.adapter_dtype]
    return Dtypes(residual=e, inner=e, matmul=adapters, head=e, master=BYTES[setup.adapter_dtype])


@dataclass
class Estimate:
    setup: Setup
    shape: ModelShape
    parts: dict[str, float] = field(default_factory=dict)  # name -> bytes live at the peak; sums to total
    activations_no_ckpt: float = 0.0  # everything autograd keeps outside the LM head, without / with checkpointing
    activations_ckpt: float = 0.0
    kept_by_head: float = 0.0  # what the LM head and loss keep for the backward pass
    weight_copies: float = 0.0  # low-precision weight copies autocast keeps for the backward pass
    trainable: int = 0
    peak_phase: str = ""

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def adapter_params(shape: ModelShape, setup: Setup) -> int:
    if _method(setup).trains_all_weights:
        return 0
    per_block = sum(setup.r * (i + o) + (o if _method(setup).weight_norms else 0)
                    for name, (i, o) in shape.linears().items() if name in setup.targets)
    return per_block * shape.layers


def weight_bytes(shape: ModelShape, setup: Setup) -> float:
    if _method(setup).trains_all_weights:
        return shape.total_params * dtypes(setup).master
    e = BYTES[setup.dtype]
    if not _method(setup).quantized_base:
        return shape.total_params * e
    quantised = shape.layers * shape.block_linear_params
    extras = shape.total_params - quantised
    return quantised * (NF4_BYTES if setup.double_quant else NF4_PLAIN_BYTES) + extras * (4 if setup.upcast_extras else e)


STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def stage_bytes(shape: ModelShape, setup: Setup, first_block: bool = False) -> list[float]:
    """Bytes per token that each stage of one block (STAGES) keeps for the backward pass.

    In the first block of an adapter run nothing before the first adapted layer needs a gradient,
    so autograd keeps only what follows it (`first_block`)."""
    d = dtypes(setup)
    full = _method(setup).trains_all_weights
    h, i = shape.hidden, shape.intermediate
    norm = d.residual * h + 4  # input + fp32 rstd per row (fused.RMSNorm)
    # q, k, v, output, log-sum-exp: what SDPA's flash kernel and accel/cpu/attention.py keep
    attention = d.inner * (2 * shape.q_width + 2 * shape.kv_width) + 4 * shape.heads
    # Per stage: (kept by the stage itself, its input's width and dtype).
    stages = [(norm + attention, h, d.residual), (0.0, shape.q_width, d.inner),
              (norm + 2 * d.inner * i, h, d.residual), (0.0, i, d.inner)]  # fused.SwiGLU: gate, up
    skip = 0
    if first_block and not full:
        skip = next((n for n, names in enumerate(STAGES) if set(names) & set(setup.targets)), len(STAGES))
    kept_by_stage = [0.0] * len(STAGES)
    for n, ((kept, width, dtype), names) in enumerate(zip(stages, STAGES)):
        if n < skip:
            continue
        first_trained = first_block and not full and n == skip
        # The first trained stage of an adapter run's first block: its input needs no gradient, so its norm keeps nothing.
        total = kept - (norm if first_trained and n in (0, 2) else 0.0)
        hit = [name for name in names if full or name in setup.targets]
        if hit:
            if dtype != d.matmul:  # each layer casts its input to the matmul dtype and keeps its copy
                total += d.matmul * len(hit) * width
            elif n != 1 or first_trained:  # o_proj's input is a view of the attention output, kept unless the attention is not
                total += dtype * width
            total += sum(d.matmul * setup.r + (2 * d.matmul * shape.linears()[name][1] if _method(setup).weight_norms else 0)
                         for name in hit if not full)
        kept_by_stage[n] = total
    return kept_by_stage


def activation_bytes(shape: ModelShape, setup: Setup, first_block: bool = False) -> float:
    """Bytes per token that one block keeps for the backward pass."""
    return sum(stage_bytes(shape, setup, first_block))


def head_chunk_rows(shape: ModelShape, setup: Setup) -> int:
    return setup.head_chunk or max(16, CHUNK_ELEMENTS // shape.vocab)  # training/loss.py head_chunk


def head_working(shape: ModelShape, setup: Setup, labels: float) -> float:
    """Peak transient bytes of the LM head's chunks in the forward pass (training/loss.py _chunks)."""
    d = dtypes(setup)
    chunk = head_chunk_rows(shape, setup)
    n = min(chunk, labels)
    v, h = shape.vocab, shape.hidden
    if setup.kept_logit_bytes:  # a loss that keeps its logits: their fp32 copy and log-softmax
        return (d.head + 4) * v * n
    # A chunk's logits and their gradient (one compiled pass computes the loss and the gradient),
    # both in the head's dtype. The previous chunk's pair is still named by the loop's variables
    # while the next chunk's logits are computed.
    row = d.head * v
    following = max(0.0, min(chunk, labels - chunk))
    trains = _method(setup).trains_all_weights and not (setup.freeze_embeddings and shape.tied)
    # the weight gradient's product (+ its fp32 copy)
    weight_grad = v * h * (d.head + (4 if d.head == 2 else 0)) if trains else 0.0
    return 2 * row * n + max(row * following, weight_grad)


def _matmul_attention(setup: Setup) -> bool:
    """Whether attention runs accel/cpu/attention.py's batched matmuls, which form score matrices
    and read the shared causal bias: on a CPU, except a padding-free row under the native kernel."""
    return setup.cpu_attention and not (setup.native_attention and not setup.packed_rows)


def attention_scores(shape: ModelShape, setup: Setup) -> float:
    """Elements of one layer's largest attention score matrices: heads x seq x seq for the whole
    batch of padded or packed rows; in a padding-free row (SegmentedAttention) one block of a
    sequence's queries at a time, its last against all the sequence's keys; 0 where the attention
    never materialises them (SDPA's flash kernels on GPUs)."""
    if not _matmul_attention(setup):
        return 0.0
    if setup.packed_rows:
        return setup.batch * shape.heads * setup.seq ** 2
    blocks = max(1, round(setup.seq / BLOCK_ROWS))  # accel/cpu/attention.py _pieces
    return shape.heads * -(-setup.seq // blocks) * setup.seq


def estimate(shape: ModelShape, setup: Setup, overhead: float = 0.0) -> Estimate:
    """Peak bytes of a training step (from the second step on, when optimizer states exist)."""
    d = dtypes(setup)
    tokens = setup.tokens or setup.batch * setup.seq
    labels = tokens * setup.label_share
    full = _method(setup).trains_all_weights
    layers = shape.layers
    checkpointed = checkpointed_layers(shape, setup)
    ckpt, ckpt_all = checkpointed > 0, checkpointed == layers  # some blocks recompute; the last one too
    embeddings_train = full and not setup.freeze_embeddings
    head_trains = full and not (setup.freeze_embeddings and shape.tied)
    h, q, kv, i = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate

    n_adapter = adapter_params(shape, setup)
    trainable = (shape.total_params - (shape.vocab * h if setup.freeze_embeddings else 0)
                 if full else n_adapter)
    grad_e = d.master
    embedding_grads = shape.vocab * h * ((not shape.tied and head_trains) + embeddings_train) if full else 0
    grads_layers = (shape.layers * shape.block_params if full else n_adapter) * grad_e
    grads_head = shape.vocab * h * grad_e if head_trains else 0.0  # the first gradient of the backward
    grads_all = grads_layers + (embedding_grads + h) * grad_e
    states = trainable * (setup.optimizer_bytes if setup.optimizer_bytes is not None else 2 * grad_e)

    stages = stage_bytes(shape, setup)
    block = sum(stages) * tokens
    first = activation_bytes(shape, setup, first_block=not ckpt) * tokens
    # checkpointed blocks keep their input (with offloading only the one back for its backward), the others everything
    inputs = (1 if setup.offload_activations else checkpointed) * d.residual * h * tokens
    kept_layers = inputs + (layers - checkpointed) * block if ckpt else (layers - 1) * block + first
    # a block's tensors before its attention output (norm, q/k/v inputs and adapters, q, k, v), and after it
    pre_attention = (stages[0] - d.inner * q - 4 * shape.heads) * tokens
    post_attention = sum(stages[1:]) * tokens
    final_norm = (d.residual * h + 4) * tokens
    rope = 2 * shape.head_dim * d.residual * (tokens if setup.tokens else setup.seq)  # a padding-free row's tables cover it
    mask = 4 * setup.seq ** 2 if _matmul_attention(setup) else 0  # accel/cpu/attention.py's fp32 causal bias, shared by every layer
    kept_other = final_norm + rope + mask + tokens + (8 * tokens if embeddings_train else 0)  # + label mask, token ids
    # autocast's low-precision copies: of every block weight (full), of fp32 DoRA adapters on a half
    # base (plain LoRA layers, accel/lora_linear.py, cast their adapters again in the backward)
    if full and BYTES[setup.dtype] == 2:
        copies = shape.layers * shape.block_linear_params * 2
    elif _method(setup).weight_norms and d.matmul == 2 and BYTES[setup.adapter_dtype] == 4:
        copies = n_adapter * 2
    else:
        copies = 0
    kept_by_head = (labels * h * d.residual + (shape.vocab * h * 4 if head_trains else 0)
                    + setup.kept_logit_bytes * shape.vocab * labels)
    # Checkpointed blocks keep no weight copies; a full fine-tune's go when the decoder's autocast
    # ends, before the head, the adapters' when the loss's does, after it.
    copies_kept = copies * (layers - checkpointed) / layers if full else copies
    grads_after = grads_layers * (layers - checkpointed) / layers  # filled when the backward reaches the checkpointed blocks
    kept_fwd = kept_layers + copies_kept
    scores = attention_scores(shape, setup)

    # The moments that can hold the peak: (label, gradients, activations, weight copies, head, working memory).
    moments = []
    if scores:
        # The last block's attention in the forward: fp32 scores and probabilities (in bf16: scores,
        # an fp32 buffer of the compiled softmax, probabilities), 8 bytes per score.
        before = kept_layers + pre_attention - (0 if ckpt_all else block)
        moments.append(("attention of the last block (forward)", 0.0, before + kept_other - final_norm, copies,
                        0.0, 8 * scores))
        if ckpt:  # ... again when the backward recomputes the last checkpointed block, with the residual stream's gradient
            moments.append(("attention of the last block (recomputed)" if ckpt_all else
                            "attention of the last checkpointed block (recomputed)", grads_head + grads_after,
                            inputs + pre_attention + kept_other - final_norm, copies / layers, 0.0,
                            8 * scores + 2 * d.residual * h * tokens))
    moments.append(("end of the decoder's forward", 0.0, kept_layers + kept_other, copies,
                    0.0, d.residual * h * tokens))
    # End of the forward pass, during the last LM-head chunk: every activation, the decoder's output
    # and its label rows, the head's cast weight (fp32 master under autocast) and the chunk's temporaries.
    head_transient = ((tokens + labels) * h * d.residual + head_working(shape, setup, labels)
                      + (shape.vocab * h * d.head if full and d.head != d.master else 0))
    moments.append(("end of the forward pass (last LM-head chunk)", 0.0, kept_layers + kept_other, copies_kept,
                    kept_by_head + head_transient, 0.0))
    # Backward: the head's gradient first, then one block at a time (under checkpointing recomputed
    # with its weight copies), each freeing its activations as it fills its gradients, so the peak
    # is at one end. A block's temporaries peak in the MLP (the gradients of down_proj's input, gate
    # and up) or the attention (of its output, q, k and v), with gradients of the residual stream.
    recompute = block + copies / layers
    block_work = tokens * (d.inner * max(3 * i, 2 * q + 2 * kv) + 2 * d.residual * h)
    if _method(setup).weight_norms:  # the weight norm materialises one full weight (and its update) in fp32
        block_work += 3 * 4 * max(a * b for a, b in shape.linears().values())
    early = kept_fwd >= grads_layers
    moments.append(("backward of the last block" if early else "backward of the first block",
                    grads_head + (0 if early else grads_layers), kept_other + (kept_layers if early else 0),
                    copies_kept if early else 0.0, 0.0, block_work + (recompute if (ckpt_all if early else ckpt) else 0.0)))
    if ckpt and not ckpt_all:  # the last checkpointed block recomputed, the blocks after it done
        moments.append(("backward of the last checkpointed block", grads_head + grads_after, kept_other + inputs,
                        0.0, 0.0, block_work + recompute))
    if scores:
        # The last block's attention backward: recomputed probabilities, their gradient and the
        # scores' gradient (3 per score, in the attention's dtype), after its MLP's tensors are gone.
        work = 3 * d.inner * scores + tokens * (d.inner * q + 2 * d.residual * h)
        acts = kept_layers - (0 if ckpt_all else post_attention)
        moments.append(("attention backward of the last block", grads_head, acts + kept_other, copies_kept, 0.0,
                        work + (recompute - post_attention if ckpt_all else 0.0)))
        if ckpt and not ckpt_all:
            moments.append(("attention backward of the last checkpointed block", grads_head + grads_after,
                            inputs + kept_other, 0.0, 0.0, work + recompute - post_attention))
    # End of the backward: every gradient, and the embedding's dense gradient while it is added to
    # a tied head's. The optimizer step adds nothing: training/loop.py's AdamW is fused.
    accumulate = shape.vocab * h * grad_e if embeddings_train and shape.tied else 0.0
    moments.append(("end of the backward pass", grads_all, 0.0, 0.0, 0.0, accumulate))

    if setup.grad_accum > 1:  # the earlier micro-batches' gradients, accumulated in place
        moments = [(name, max(grads, grads_all), *rest) for name, grads, *rest in moments]
    label, gradients, activations, weight_copies, head, working = max(moments, key=lambda m: sum(m[1:]))
    parts = {
        "weights": weight_bytes(shape, setup),
        "adapter weights": n_adapter * BYTES[setup.adapter_dtype],
        "gradients": gradients,
        "optimizer states": states,
        "activations": activations,
        "autocast weight copies": weight_copies,
        "logits and loss": head,
        "working memory": working,
        "framework overhead": overhead,
    }
    if setup.reference_copy:
        parts["reference copy"] = shape.total_params * BYTES[setup.dtype]
    return Estimate(setup=setup, shape=shape, parts=parts, trainable=trainable, peak_phase=label,
                    activations_no_ckpt=(shape.layers - 1) * block + first + kept_other, kept_by_head=kept_by_head,
                    activations_ckpt=shape.layers * d.residual * h * tokens + block + kept_other,
                    weight_copies=copies)

