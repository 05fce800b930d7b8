"""What an objective (train.objective, issue 23) adds to a run's memory, for `tunesmith plan` and the
plan said at the start of a run.

- dpo, orpo, simpo: a micro-batch of `batch_size` pairs is 2 x batch_size sequences, all kept for
  the backward (chosen and rejected go through one forward);
- kto: each answer's KL sequence runs without gradients, so only the answers are kept;
- grpo: `batch_size` prompts with group_size sampled answers each: batch_size x group_size
  sequences of up to max_seq_len tokens; sampling first holds a KV cache for them (freed before the
  training forward, so it is not part of the training peak, and is reported beside it);
- the reference (dpo, kto; grpo with beta > 0) costs nothing for adapter methods (the adapters are
  disabled) and its forward runs without gradients before the policy's; a full fine-tune keeps a
  frozen copy of the weights.
"""
from __future__ import annotations

from dataclasses import replace

from .setup import BYTES, Setup
from .shapes import ModelShape

SEQUENCES_PER_EXAMPLE = {"dpo": 2, "orpo": 2, "simpo": 2}


def objective_setup(cfg, setup: Setup) -> Setup:
    """`setup` (a config's micro-batch of SFT examples, batch x seq) as the configured objective runs it."""
    train = cfg.train
    objective = getattr(train, "objective", "sft")
    if objective == "sft":
        return setup
    per_example = train.group_size if objective == "grpo" else SEQUENCES_PER_EXAMPLE.get(objective, 1)
    return counted_setup(cfg, replace(setup, batch=setup.batch * per_example))


def counted_setup(cfg, setup: Setup) -> Setup:
    """`setup`, whose micro-batch is already counted in the sequences the objective trains on, with
    the objective's other terms: GRPO's sampling cache, a full fine-tune's reference copy."""
    from ..methods import get
    from ..objectives import needs_reference

    objective = getattr(cfg.train, "objective", "sft")
    reference = needs_reference(cfg.train)
    return replace(setup, objective=objective, sampled_tokens=setup.batch * setup.seq if objective == "grpo" else 0,
                   reference_copy=get(setup.method).trains_all_weights and reference, reference_forward=reference)


def trained_lengths(example, train, max_len: int) -> list[int]:
    """Lengths of the sequences one example puts through the forward that keeps activations for
    the backward: SFT its own; a pair both; KTO the answer (its KL sequence runs without
    gradients); a GRPO prompt group_size answers of up to max_completion_tokens after it."""
    objective = getattr(train, "objective", "sft")
    if objective == "grpo":
        return [min(max_len, len(example.input_ids) + train.max_completion_tokens)] * train.group_size
    if objective == "kto":
        return [len(example.completion.input_ids)]
    return [len(s.input_ids) for s in getattr(example, "sequences", None) or [example]]


def label_share(examples: list, train, max_len: int) -> float:
    """Share of the trained positions that carry a label (GRPO: the sampled answers, as long as
    max_completion_tokens at most; the prompts have none)."""
    if getattr(train, "objective", "sft") == "grpo":
        lengths = [n for e in examples for n in trained_lengths(e, train, max_len)]
        return min(1.0, len(lengths) * train.max_completion_tokens / max(1, sum(lengths)))
    return sum(e.label_count for e in examples) / max(1, sum(len(e.input_ids) for e in examples))


def sampling_cache_bytes(shape: ModelShape, setup: Setup) -> float:
    """GRPO's KV cache while it samples (keys and values of every layer, every sampled token)."""
    return 2 * shape.layers * shape.kv_width * BYTES[setup.dtype] * setup.sampled_tokens


def describe(shape: ModelShape, setup: Setup) -> str | None:
    """One line about the objective for the plan's output, or None for SFT."""
    if setup.objective == "sft":
        return None
    reference = "a frozen copy of the weights" if setup.reference_copy else "no extra weights"
    line = f"objective: {setup.objective}, micro-batches of {setup.batch} sequences; reference: {reference}"
    if setup.sampled_tokens:
        line += (f"; sampling holds a KV cache of {sampling_cache_bytes(shape, setup) / 2**30:.2f} GiB before each step"
                 " (the epoch time below leaves sampling out: it counts the training forward and backward)")
    return line
