"""The preference and reward objectives against TRL's trainers (the `bench` extra; skipped without
it, installed by .ci/run): on the same tiny model, adapters, token sequences and settings, the loss
and every LoRA gradient agree within 1e-4 (relative to the largest gradient of each tensor).

tunesmith runs through its fast paths (padding-free batches) and through plain transformers +
peft (padded batches); TRL runs plain. Both see the same token ids: the prompt as rendered with
the chat template, each answer up to and including its end-of-turn token (TRL's collators are fed
those ids directly, so the test compares the objectives, not two tokenisations).
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from helpers import assert_same_gradients, gradients, lora_model, write_jsonl
from tunesmith.config import validate
from tunesmith.data.collate import PADDED, PADDING_FREE
from tunesmith.data.preference import PAIRS, UNPAIRED, answer_start, prepare_preference
from tunesmith.data.tokenize import IGNORE, Encoded
from tunesmith.models import load_model
from tunesmith.objectives.logps import Reference

trl = pytest.importorskip("trl", reason="TRL (pip install -e '.[bench]') is the reference these tests compare with")
TOLERANCE = 1e-4
LAYOUTS = [(True, PADDING_FREE), (False, PADDED)]  # (fast paths, batch layout)


def pair_rows(n: int = 6) -> list[dict]:
    rng = random.Random(4)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = []
    for i in range(n):
        prompt = "Repeat: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        rows.append({"prompt": prompt, "chosen": prompt[8:], "rejected": " ".join(rng.choice(words) for _ in range(rng.randint(1, 7)))})
    return rows


def config(objective: str, **train):
    return validate({"train": {"objective": objective, **train}})


@pytest.fixture(scope="module")
def pairs(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_rows())
    cfg = config("dpo", ).data.model_copy(update={"train": str(path), "validation": str(path)})
    return prepare_preference(cfg, tiny_tokenizer, PAIRS).splits["train"].encoded


@pytest.fixture(scope="module")
def unpaired(tiny_tokenizer, tmp_path_factory):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
            for i, r in enumerate(pair_rows())]
    path = write_jsonl(tmp_path_factory.mktemp("kto") / "kto.jsonl", rows)
    cfg = config("kto").data.model_copy(update={"train": str(path), "validation": str(path)})
    return prepare_preference(cfg, tiny_tokenizer, UNPAIRED).splits["train"].encoded


def models(model_dir, fast: bool, seed: int = 3):
    """(tunesmith's model, TRL's model): the same seeded LoRA (non-zero B, so policy != reference)."""
    return lora_model(load_model(str(model_dir)), seed=seed, fast_paths=fast), \
        lora_model(load_model(str(model_dir)), seed=seed, fast_paths=False)


def answer_ids(encoded: Encoded) -> list[int]:
    """The labelled tokens: the answer through its end-of-turn token."""
    start = answer_start(encoded)
    end = max(i for i, t in enumerate(encoded.labels) if t != IGNORE)
    return list(encoded.input_ids[start:end + 1])


def prompt_ids(encoded: Encoded) -> list[int]:
    return list(encoded.input_ids[:answer_start(encoded)])


def ours(objective, model, examples) -> tuple[torch.Tensor, dict]:
    """tunesmith's loss on one micro-batch (normalised by its own counts, as a one-batch step is) and gradients."""
    batch = objective.batch(examples)
    terms, _ = objective.loss(model, batch.tensors)
    loss = sum(value / batch.counts[key] for key, value in terms.items())
    loss.backward()
    return loss.detach(), gradients(model)


def theirs(trainer, model, inputs) -> tuple[torch.Tensor, dict]:
    if "ref" in getattr(trainer.model, "peft_config", {}):
        # Given a PEFT model, TRL takes its adapter as the reference (a copy named "ref"); tunesmith's reference
        # is the starting point with the adapters disabled (a new adapter on the base, or on a merged earlier run).
        trainer.model.delete_adapter("ref")
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), gradients(model)


def assert_same(mine, reference):
    assert torch.allclose(mine[0], reference[0].float(), rtol=TOLERANCE, atol=1e-6), (mine[0], reference[0])
    assert_same_gradients(reference[1], mine[1], TOLERANCE)


def trainer_args(kind, tmp_path, **settings):
    return kind(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                per_device_train_batch_size=6, **settings)


def text_dataset():
    from datasets import Dataset

    return Dataset.from_list(pair_rows())


@pytest.mark.parametrize("fast,layout", LAYOUTS)
@pytest.mark.parametrize("loss_type,settings,sft_weight", [("sigmoid", {"beta": 0.5}, 0.0), ("ipo", {"beta": 0.3}, 0.0),
                                                          ("sigmoid", {"beta": 0.5}, 0.7)])
def test_dpo_equals_trl(pairs, tiny_model_dir, tiny_tokenizer, tmp_path, fast, layout, loss_type, settings, sft_weight):
    """sft_weight (RPO) is TRL's loss_type [..., 'sft'] with loss_weights [1, w]: the chosen answers' mean NLL."""
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tunesmith.objectives.dpo import DPO

    mine, reference = models(tiny_model_dir, fast)
    objective = DPO(config("dpo", dpo_loss=loss_type, sft_weight=sft_weight, **settings), Reference(mine), layout,
                    tiny_tokenizer.pad_token_id)
    losses = {"loss_type": [loss_type, "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight else {"loss_type": [loss_type]}
    trainer = DPOTrainer(model=reference, args=trainer_args(DPOConfig, tmp_path, **losses, **settings),
                         train_dataset=text_dataset(), processing_class=tiny_tokenizer)
    rows = [{"prompt_ids": prompt_ids(p.chosen), "chosen_ids": answer_ids(p.chosen), "rejected_ids": answer_ids(p.rejected)}
            for p in pairs]
    expected = theirs(trainer, trainer.model, DataCollatorForPreference(pad_token_id=tiny_tokenizer.pad_token_id)(rows))
    assert abs(float(expected[0]) - 0.6931) > 1e-3 or loss_type != "sigmoid"  # the policy differs from the reference
    assert_same(ours(objective, mine, pairs), expected)


@pytest.mark.parametrize("fast,layout", LAYOUTS)
def test_dpo_with_precomputed_reference_equals_trl(pairs, tiny_model_dir, tiny_tokenizer, tmp_path, fast, layout):
    """train.precompute_ref: the reference log-probs computed once give the same loss and gradients."""
    from tunesmith.objectives.dpo import DPO
    from tunesmith.data.prepare import Split

    mine, _ = models(tiny_model_dir, fast)
    again, _ = models(tiny_model_dir, fast)
    cfg = config("dpo", beta=0.5, precompute_ref=True)
    stored = [type(p)(p.chosen, p.rejected) for p in pairs]
    precomputed = DPO(cfg, Reference(mine), layout, tiny_tokenizer.pad_token_id)
    precomputed.prepare(mine, [Split("train", [], stored)])
    assert all(p.reference is not None for p in stored)
    live = DPO(config("dpo", beta=0.5), Reference(again), layout, tiny_tokenizer.pad_token_id)
    assert "reference" in precomputed.batch(stored).tensors
    assert_same(ours(precomputed, mine, stored), ours(live, again, pairs))


@pytest.mark.parametrize("fast,layout", LAYOUTS)
def test_kto_equals_trl(unpaired, tiny_model_dir, tiny_tokenizer, tmp_path, fast, layout):
    """Desirable and undesirable answers with different weights; the KL term from mismatched pairs
    (each prompt with the previous example's answer, as TRL's data preparation pairs them)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from tunesmith.objectives.kto import KTO

    settings = {"beta": 0.5, "desirable_weight": 1.3, "undesirable_weight": 0.7}
    mine, reference = models(tiny_model_dir, fast, seed=5)  # a seed whose KL estimate is above 0 (not clamped)
    cfg = config("kto", beta=0.5, kto_desirable_weight=1.3, kto_undesirable_weight=0.7)
    objective = KTO(cfg, Reference(mine), layout, tiny_tokenizer.pad_token_id)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"], "label": bool(i % 2)}
                                 for i, r in enumerate(pair_rows())])
    trainer = KTOTrainer(model=reference, args=trainer_args(KTOConfig, tmp_path, **settings), train_dataset=dataset,
                         processing_class=tiny_tokenizer)
    rows = [{"prompt_ids": prompt_ids(e.completion), "completion_ids": answer_ids(e.completion),
             "KL_completion_ids": answer_ids(unpaired[i - 1].completion), "label": e.desirable}
            for i, e in enumerate(unpaired)]
    assert {e.desirable for e in unpaired} == {True, False}
    _, stats = objective.loss(mine, objective.batch(unpaired).tensors)
    assert stats["kl"][0] > 0.01
    expected = theirs(trainer, trainer.model, DataCollatorForUnpairedPreference(pad_token_id=tiny_tokenizer.pad_token_id)(rows))
    assert_same(ours(objective, mine, unpaired), expected)


def test_kto_kl_estimate_below_zero_counts_as_zero(monkeypatch):
    """z = max(0, mean KL estimate): a policy that puts less mass than the reference on the mismatched
    answers gives a negative raw mean, which must not shift the desirable and undesirable terms (the
    TRL comparison above uses a seed whose estimate is positive, so the clamp goes unchecked there).
    Per-token log-probs are given by hand; the loss is the docstring's formula with z = 0."""
    from tunesmith.objectives import kto

    monkeypatch.setattr(kto, "token_logps", lambda model, batch: batch["logps"])
    side = lambda logps, owner: {"logps": torch.tensor(logps), "label_sequence": torch.tensor(owner),  # noqa: E731
                                 "sequence_count": 2}
    tensors = {"answers": side([-1.0, -0.5, -2.0], [0, 0, 1]),  # per answer: -1.5, -2.0
               "kl": side([-3.0, -1.0, -1.0], [0, 1, 1]),  # per mismatched sequence: -3.0, -2.0
               "desirable": torch.tensor([True, False]),
               "reference": torch.tensor([-2.0, -1.0, -1.0, -1.5])}  # answers, then KL sequences
    objective = kto.KTO(config("kto", beta=0.5, kto_desirable_weight=1.3, kto_undesirable_weight=0.7), None)
    terms, stats = objective.loss(None, tensors)
    # raw KL mean: ((-3.0 + 1.0) + (-2.0 + 1.5)) / 2 = -1.25 -> z = 0; ratios: -1.5 + 2.0 = 0.5, -2.0 + 1.0 = -1.0
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = 1.3 * (1 - sigmoid(0.5 * (0.5 - 0))) + 0.7 * (1 - sigmoid(0.5 * (0 - -1.0)))
    assert stats["kl"].tolist() == [0.0, 1.0]
    assert float(terms["examples"]) == pytest.approx(expected, rel=1e-6)


def test_pair_reward_accuracy_counts_strict_wins_only():
    """rewards/accuracy is the share of pairs whose chosen reward is above the rejected one: a tie is
    no win, and the direction matters (2 wins, 1 tie, 1 loss of 4 pairs)."""
    from tunesmith.objectives.pairwise import reward_stats

    stats = reward_stats(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0.0, 2.0, 4.0, 1.0]))
    assert stats["rewards/accuracy"].tolist() == [2.0, 4.0]
    assert stats["rewards/margin"].tolist() == [1.0 + 0.0 - 1.0 + 4.0, 4.0]


def padded_side(sequences: list[Encoded], pad_id: int, prefix: str) -> dict:
    """The chosen_* or rejected_* tensors of TRL's ORPO and CPO batches (labels -100 on the prompt)."""
    width = max(len(e.input_ids) for e in sequences)
    grow = lambda values, fill: [list(v) + [fill] * (width - len(v)) for v in values]  # noqa: E731
    return {f"{prefix}_input_ids": torch.tensor(grow([e.input_ids for e in sequences], pad_id)),
            f"{prefix}_attention_mask": torch.tensor(grow([[1] * len(e.input_ids) for e in sequences], 0)),
            f"{prefix}_labels": torch.tensor(grow([e.labels for e in sequences], IGNORE))}


def old_style_batch(examples, pad_id: int) -> dict:
    return {**padded_side([e.chosen for e in examples], pad_id, "chosen"),
            **padded_side([e.rejected for e in examples], pad_id, "rejected")}


def trimmed(pair):
    """The pair with its answers only (the trailing text after the end-of-turn token dropped), as
    TRL's ORPO and CPO batches hold them."""
    from tunesmith.data.preference import Pair

    def cut(encoded):
        end = max(i for i, t in enumerate(encoded.labels) if t != IGNORE) + 1
        return Encoded(list(encoded.input_ids[:end]), list(encoded.labels[:end]))

    return Pair(cut(pair.chosen), cut(pair.rejected))


def one_token_prompt(pair):
    """The pair with its prompt cut to its last token: TRL's ORPO puts its NLL on every token of the
    chosen sequence, tunesmith on the answer only; with a one-token prompt (never predicted) they coincide."""
    from tunesmith.data.preference import Pair

    def cut(encoded):
        start = answer_start(encoded) - 1
        return Encoded(list(encoded.input_ids[start:]), [IGNORE] + list(encoded.labels[start + 1:]))

    return Pair(cut(pair.chosen), cut(pair.rejected))


@pytest.mark.parametrize("fast,layout", LAYOUTS)
def test_orpo_equals_trl(pairs, tiny_model_dir, tiny_tokenizer, tmp_path, fast, layout):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from tunesmith.objectives.orpo import ORPO

    examples = [trimmed(one_token_prompt(p)) for p in pairs]
    mine, reference = models(tiny_model_dir, fast)
    objective = ORPO(config("orpo", beta=0.4), None, layout, tiny_tokenizer.pad_token_id)
    trainer = ORPOTrainer(model=reference, args=trainer_args(ORPOConfig, tmp_path, beta=0.4),
                          train_dataset=text_dataset(), processing_class=tiny_tokenizer)
    loss, _ = trainer.get_batch_loss_metrics(trainer.model, old_style_batch(examples, tiny_tokenizer.pad_token_id))
    loss.backward()
    assert_same(ours(objective, mine, examples), (loss.detach(), gradients(trainer.model)))


def test_orpo_on_chat_prompts_is_answer_nll_plus_trl_odds_ratio(pairs, tiny_model_dir, tiny_tokenizer, tmp_path):
    """With whole chat prompts: the NLL of the answer tokens (not the prompt's, unlike TRL's ORPO) plus
    TRL's odds-ratio term on the same per-token mean log-probabilities."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from tunesmith.objectives.orpo import ORPO

    examples = [trimmed(p) for p in pairs]
    mine, reference = models(tiny_model_dir, True)
    objective = ORPO(config("orpo", beta=0.4), None, PADDING_FREE, tiny_tokenizer.pad_token_id)
    trainer = ORPOTrainer(model=reference, args=trainer_args(ORPOConfig, tmp_path, beta=0.4),
                          train_dataset=text_dataset(), processing_class=tiny_tokenizer)
    batch = trainer.concatenated_inputs(old_style_batch(examples, tiny_tokenizer.pad_token_id),
                                        padding_value=tiny_tokenizer.pad_token_id)
    logits = trainer.model(batch["concatenated_input_ids"], attention_mask=batch["concatenated_attention_mask"]).logits
    labels = batch["concatenated_labels"]
    means = trainer.get_batch_logps(logits, labels, average_log_prob=True)
    odds, *_ = trainer.odds_ratio_loss(*means.chunk(2))
    n = len(examples)
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].reshape(-1, logits.shape[-1]), labels[:n, 1:].reshape(-1))
    expected = nll - odds.mean()
    expected.backward()
    assert_same(ours(objective, mine, examples), (expected.detach(), gradients(trainer.model)))


@pytest.mark.parametrize("fast,layout", LAYOUTS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo_simpo(pairs, tiny_model_dir, tiny_tokenizer, tmp_path, fast, layout, smoothing):
    """SimPO is TRL's CPOTrainer with loss_type='simpo' and cpo_alpha=0 (no NLL term)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from tunesmith.objectives.simpo import SimPO

    examples = [trimmed(p) for p in pairs]
    mine, reference = models(tiny_model_dir, fast)
    objective = SimPO(config("simpo", beta=2.5, simpo_gamma=0.7, label_smoothing=smoothing), None, layout,
                      tiny_tokenizer.pad_token_id)
    args = trainer_args(CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0, beta=2.5, simpo_gamma=0.7,
                        label_smoothing=smoothing)
    trainer = CPOTrainer(model=reference, args=args, train_dataset=text_dataset(), processing_class=tiny_tokenizer)
    loss, _ = trainer.get_batch_loss_metrics(trainer.model, old_style_batch(examples, tiny_tokenizer.pad_token_id))
    loss.backward()
    assert_same(ours(objective, mine, examples), (loss.detach(), gradients(trainer.model)))
