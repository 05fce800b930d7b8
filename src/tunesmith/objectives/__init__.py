"""Training objectives: what a run optimises (`train.objective`).

- sft: imitate the answers (training/loss.py; the loop's own path, unchanged);
- dpo, orpo, simpo: preference pairs, chosen vs rejected (dpo.py, orpo.py, simpo.py);
- kto: unpaired answers marked desirable or not (kto.py);
- grpo: answers sampled in groups during training, rewarded by the user's scorers (grpo.py).

Each non-SFT objective is an `Objective` (base.py): data -> batches, batch -> loss sums with their
counts and statistics; the loop (training/loop.py fit) calls its `train_step` and records its
statistics, everything else (methods, checkpoints, resume, early stopping, evaluation, export,
several processes) is the same as for SFT. This module stays light (no torch): the config and the
plan read the names from here.
"""
from __future__ import annotations

from ..errors import UserError
from .settings import DEFAULT_BETA, OBJECTIVE_NAMES

NAMES = OBJECTIVE_NAMES
DESCRIPTIONS = {
    "sft": "imitate the answers (supervised fine-tuning)",
    "dpo": "prefer chosen over rejected answers, relative to the starting model (reference)",
    "orpo": "SFT on the chosen answers plus an odds-ratio preference term; no reference",
    "kto": "unpaired answers marked desirable or undesirable, relative to the reference",
    "simpo": "prefer chosen over rejected by length-normalised log-probability; no reference",
    "grpo": "sample groups of answers, reward them with your scorers, reinforce the better ones",
}
DATA_KIND = {"dpo": "pairs", "orpo": "pairs", "simpo": "pairs", "kto": "unpaired", "grpo": "prompts"}
# What a run's eval_loss is, where it is not the mean answer-token loss of SFT.
EVAL_LOSS = {
    "dpo": "the DPO loss on the validation pairs (0.693 = no preference)",
    "orpo": "the ORPO loss (NLL of the chosen answers plus the odds-ratio term) on the validation pairs",
    "simpo": "the SimPO loss on the validation pairs",
    "kto": "the KTO loss on the validation answers",
    "grpo": "minus the mean reward of greedy answers to the validation prompts",
}


def eval_loss_note(train_cfg) -> str:
    """What a run's eval_loss is; DPO's holds its SFT term too (`sft_weight`), so it does not start at 0.693."""
    note = EVAL_LOSS[train_cfg.objective]
    if train_cfg.objective == "dpo" and train_cfg.sft_weight:
        note = (f"the DPO loss on the validation pairs plus sft_weight {train_cfg.sft_weight:g} x the chosen "
                "answers' mean NLL (the DPO part alone: 0.693 = no preference)")
    return note


def needs_reference(train_cfg) -> bool:
    """Whether the objective compares with a reference policy (GRPO only with a KL term, beta > 0)."""
    objective = train_cfg.objective
    return objective in ("dpo", "kto") or (objective == "grpo" and train_cfg.objective_beta() > 0)


def prepare_data(cfg, tokenizer):
    """The run's splits as its objective reads its data: SFT records (data/prepare.py), pairs and KTO
    answers (data/preference.py), GRPO prompts (data/prompts.py). `tokenizer`: a loaded one, or the
    model's name (SFT data loads it only where the tokenised data is not cached)."""
    if cfg.train.objective == "sft":
        from ..data.prepare import prepare

        return prepare(cfg.data, tokenizer)
    if isinstance(tokenizer, str):
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(tokenizer, cfg.model.trust_remote_code)
    kind = DATA_KIND[cfg.train.objective]
    if kind == "prompts":
        from ..data.prompts import prepare_prompts

        prepared = prepare_prompts(cfg.data, tokenizer, cfg.train.max_completion_tokens)
        if not cfg.train.rewards:  # the built-in reward scores against the reference: said now, not at the step
            for split in prepared.splits.values():  # that first samples such a prompt, mid-run
                unreferenced = [o for p, o in zip(split.encoded, split.origins) if p.reference is None]
                if unreferenced:
                    file, line = unreferenced[0]
                    raise UserError(f"{file}:{line}: a prompt without a reference ({len(unreferenced)} in "
                                    f"{split.name}), and no train.rewards to score its answers: give each prompt a "
                                    "reference, or set train.rewards")
        return prepared
    from ..data.preference import prepare_preference

    return prepare_preference(cfg.data, tokenizer, kind)


def answered_conversations(spec: str, data_cfg, objective: str) -> list[list[dict]]:
    """The conversations of an objective's data file that end in a good answer, read as its training
    reads them: each pair's prompt with its chosen answer, each desirable KTO answer, each GRPO prompt
    with its reference (prompts without one are left out). They stand for the task where a command
    needs examples of it: export's checks, compare's shots, the system prompt a run trained with."""
    kind = DATA_KIND[objective]
    problems: list = []
    if kind == "prompts":
        from ..data.prompts import read_prompts

        prompts, answers, _, _ = read_prompts(spec, data_cfg, problems)  # answers: the references
    else:
        from ..data.preference import good_answers

        prompts, answers = good_answers(spec, kind, data_cfg, problems)
    return [prompt + [{"role": "assistant", "content": answer}] for prompt, answer in zip(prompts, answers)
            if answer is not None]


def build(cfg, model, tokenizer, method, device, layout: str):
    """The objective of a run, its reference set up (the adapters disabled, or a frozen copy)."""
    from .logps import Reference

    reference = None
    if needs_reference(cfg.train):
        copy = _reference_copy(cfg, method, device) if method.trains_all_weights else None
        reference = Reference(model, copy)
        if cfg.adapter.dropout and not method.trains_all_weights:
            from ..progress import say

            say(f"warning: adapter.dropout {cfg.adapter.dropout:g} with train.objective {cfg.train.objective}: the "
                "log-ratios to the reference (run without dropout) carry the dropout's noise; TRL turns dropout "
                "off for DPO and KTO (adapter.dropout: 0)")
    pad_id = tokenizer.pad_token_id
    name = cfg.train.objective
    if name == "grpo":
        from .grpo import GRPO

        return GRPO(cfg, reference, layout, pad_id, tokenizer)
    from .dpo import DPO
    from .kto import KTO
    from .orpo import ORPO
    from .simpo import SimPO

    return {"dpo": DPO, "orpo": ORPO, "kto": KTO, "simpo": SimPO}[name](cfg, reference, layout, pad_id)


def _reference_copy(cfg, method, device):
    """Full fine-tuning changes every weight: the reference is a second, frozen copy of the base."""
    from .. import accel
    from ..device import compute_dtype

    copy = method.load_base(cfg.model.name, compute_dtype(cfg.model.dtype, device), device, cfg.model.trust_remote_code)
    for param in copy.parameters():
        param.requires_grad_(False)
    accel.apply(copy, device, cfg.train.fast_paths)  # the same attention, so it reads the run's batch layout
    return copy.eval()


__all__ = ["NAMES", "DESCRIPTIONS", "DEFAULT_BETA", "needs_reference", "prepare_data", "build"]
