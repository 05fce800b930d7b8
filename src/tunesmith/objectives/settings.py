"""The `train.*` settings of the training objectives (config.py's TrainConfig takes them in).

Kept here, beside the objectives, so that config.py only names this mixin. Pure pydantic: the
config imports it, so nothing heavy (torch, transformers) may be imported here.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

OBJECTIVE_NAMES = ("sft", "dpo", "orpo", "kto", "simpo", "grpo")
# beta's meaning and default differ by objective (see the field's description).
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0, "grpo": 0.04}
# The objectives that read each setting below (their code in this folder; sft reads none of them).
READ_BY = {
    "beta": ("dpo", "orpo", "kto", "simpo", "grpo"),
    "label_smoothing": ("dpo", "simpo"),
    "dpo_loss": ("dpo",),
    "sft_weight": ("dpo",),  # ORPO's NLL term has weight 1, beta weighs its odds-ratio term
    "simpo_gamma": ("simpo",),
    "kto_desirable_weight": ("kto",),
    "kto_undesirable_weight": ("kto",),
    "precompute_ref": ("dpo", "kto"),  # GRPO's reference scores answers sampled in the step
    **dict.fromkeys(("rewards", "reward_weights", "group_size", "max_completion_tokens", "temperature",
                     "clip_epsilon", "scale_rewards", "grpo_loss"), ("grpo",)),
}
# beta 0 leaves these losses constant (log sigmoid(0); KTO's 1 - sigmoid(0); SimPO's -gamma): nothing trains.
# ORPO's is then its NLL term alone, SFT on the chosen answers; GRPO's the policy term without the KL.
CONSTANT_AT_BETA_0 = ("dpo", "kto", "simpo")


class ObjectiveSettings(BaseModel):
    objective: Literal[OBJECTIVE_NAMES] = Field(  # type: ignore[valid-type]
        "sft", description="What training optimises: 'sft' (imitate the answers), 'dpo', 'orpo', 'kto', 'simpo' "
        "(preference data: chosen vs rejected, or KTO's desirable/undesirable), 'grpo' (rewards from your scorers "
        "on sampled answers). See docs/objectives.md.")
    beta: float | None = Field(
        None, ge=0, description="Strength of the objective's main term; null = its default: dpo/kto 0.1 (KL to the "
        "reference), orpo 0.1 (lambda, weight of the odds-ratio term), simpo 2.0 (reward scale), grpo 0.04 "
        "(KL to the reference; 0 = no reference forward).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo (sigmoid) and simpo: assumed share of flipped preference labels "
                                       "(conservative DPO); 0 = off.")
    dpo_loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="dpo: 'sigmoid' (the DPO paper) or 'ipo' (squared loss on length-averaged log-ratios).")
    sft_weight: float = Field(
        0.0, ge=0, description="dpo: weight of an SFT term (mean negative log-likelihood of the chosen answers' "
        "tokens) added to the DPO loss, which holds the answers' format while the preference moves them (RPO; TRL's "
        "loss_type ['sigmoid', 'sft'] with loss_weights [1, w]); 0 = plain DPO.")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin gamma.")
    kto_desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable examples' losses.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable examples' losses.")
    precompute_ref: bool = Field(
        False, description="dpo/kto: compute the reference log-probabilities once per example before training "
                           "(one no-grad pass over the data) instead of in every step.")
    rewards: list[str] = Field(
        default_factory=list, description="grpo: your scorers as 'module:function', each called as "
        "function(prediction, reference) -> float (or a dict of floats, whose 'reward' or 'score' key or else "
        "mean is taken), like eval.scorer; empty = the reference's own metric (JSON fields right, else ROUGE-L).")
    reward_weights: list[float] | None = Field(
        None, description="grpo: weight of each scorer in train.rewards (default 1 each).")
    group_size: int = Field(4, ge=2, description="grpo: answers sampled per prompt (G); advantages are normalised "
                                                 "within each prompt's group.")
    max_completion_tokens: int = Field(64, ge=1, description="grpo: longest sampled answer (tokens).")
    temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the answers (the log-probs "
                                                      "of the loss use the same temperature).")
    clip_epsilon: float = Field(0.2, gt=0, lt=1, description="grpo: the policy ratio is clipped to [1 - eps, 1 + eps].")
    scale_rewards: bool = Field(True, description="grpo: divide each group's advantages by its reward standard "
                                                  "deviation (false: Dr. GRPO).")
    grpo_loss: Literal["dapo", "dr_grpo", "grpo"] = Field(
        "dapo", description="grpo: how the per-token loss is normalised over an optimizer step: 'dapo' (by its "
        "answer tokens), 'dr_grpo' (by answers x max_completion_tokens), 'grpo' (mean per answer, then over answers).")

    @model_validator(mode="after")
    def _weights_match_rewards(self):
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            scorers = f"{len(self.rewards)} scorer" + ("s" if len(self.rewards) != 1 else "")
            raise ValueError(f"train.reward_weights has {len(self.reward_weights)} weights for the {scorers} of "
                             "train.rewards: give one weight per scorer")
        return self

    def objective_refusal(self) -> str | None:
        """Why a new run refuses these settings, or None: one its objective does not read, set to other than
        its default (it would be ignored without a word), or a beta that leaves the loss constant. Not a
        validator: a run folder written before these rules still loads (api.check_data_paths). Compared
        with the default, not model_fields_set: a run's config.yaml holds every setting."""
        for name, readers in READ_BY.items():
            default = type(self).model_fields[name].get_default(call_default_factory=True)
            if self.objective not in readers and getattr(self, name) != default:
                return f"train.{name} applies to train.objective: {', '.join(readers)} only, not {self.objective}"
        if self.beta == 0 and self.objective in CONSTANT_AT_BETA_0:
            return (f"train.beta: 0 leaves the {self.objective} loss constant, so nothing would train; give beta "
                    f"above 0 (null: the default, {DEFAULT_BETA[self.objective]})")
        if self.objective == "dpo" and self.dpo_loss == "ipo" and self.label_smoothing:
            return "train.label_smoothing applies to train.dpo_loss: sigmoid only, not ipo"
        return None

    def objective_beta(self) -> float:
        """beta, or the objective's default."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.objective, 0.0)
