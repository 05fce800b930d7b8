"""GRPO on a fixed batch of answers and rewards: group-normalised advantages, the clipped policy ratio,
the KL to the reference (the adapters disabled) and the three normalisations, against a hand
computation of the formula from full-vocabulary logits and against TRL's GRPOTrainer loss."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_same_gradients, gradients, lora_model
from tunesmith.config import validate
from tunesmith.errors import UserError
from tunesmith.data.collate import PADDED, PADDING_FREE
from tunesmith.models import load_model
from tunesmith.objectives.grpo import GRPO, group_advantages
from tunesmith.objectives.logps import Reference
from tunesmith.objectives.rewards import Rewards, reference_metric, scalar

TEMPERATURE, EPSILON, GROUP, MAX_ANSWER = 0.7, 0.2, 3, 7
REWARDS = [1.0, 0.0, 0.5, 0.2, 0.2, 0.9]


def fixed_batch(tokenizer):
    """Two prompts of equal length (TRL left-pads prompts; equal lengths keep positions alike), three
    answers each of different lengths, ending with the end-of-turn token (or cut at MAX_ANSWER)."""
    from tunesmith.data.prompts import encode_prompts

    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": "Repeat: alpha beta"}],
                                         [{"role": "user", "content": "Repeat: beta alpha"}]])
    assert len(prompts[0]) == len(prompts[1])
    generator = torch.Generator().manual_seed(1)
    eos = tokenizer.eos_token_id
    answers = []
    for length in (3, 7, 5, 2, 6, 7):
        body = torch.randint(3, len(tokenizer), (length,), generator=generator).tolist()
        answers.append(body[:-1] + [eos] if length < MAX_ANSWER else body)
    return [p for p in prompts for _ in range(GROUP)], answers


def grpo(beta: float, loss: str, layout: str, tokenizer, model):
    cfg = validate({"train": {"objective": "grpo", "beta": beta, "grpo_loss": loss, "group_size": GROUP,
                              "temperature": TEMPERATURE, "clip_epsilon": EPSILON, "max_completion_tokens": MAX_ANSWER,
                              "rewards": ["tunesmith.objectives.rewards:reference_metric"]}})
    return GRPO(cfg, Reference(model) if beta else None, layout, tokenizer.pad_token_id, tokenizer)


def old_logps_for(model, prompts, answers) -> list[torch.Tensor]:
    """The sampling policy's log-probs: the current ones shifted by up to +-0.35, so that some ratios
    fall outside [1 - eps, 1 + eps] and are clipped."""
    generator = torch.Generator().manual_seed(2)
    return [logps.detach() + (torch.rand(len(a), generator=generator) - 0.5) * 0.7
            for logps, a in zip(hand_logps(model, prompts, answers), answers)]


def hand_logps(model, prompts, answers) -> list[torch.Tensor]:
    """Per answer token: log softmax(logits / T) from the plain full-vocabulary forward, one sequence at a time."""
    out = []
    for prompt, answer in zip(prompts, answers):
        ids = torch.tensor([prompt + answer])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / TEMPERATURE
        out.append(torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(answer)[:, None]).squeeze(1))
    return out


def hand_loss(model, prompts, answers, advantages, old, beta, loss):
    logps = hand_logps(model, prompts, answers)
    if beta:
        with torch.no_grad(), model.disable_adapter():
            reference = hand_logps(model, prompts, answers)
    per_answer = []
    for i, lp in enumerate(logps):
        ratio = torch.exp(lp - old[i])
        a = float(advantages[i])
        clipped = torch.clamp(ratio, 1 - EPSILON, 1 + EPSILON)
        term = -torch.minimum(ratio * a, clipped * a)
        if beta:
            d = reference[i] - lp
            term = term + beta * (torch.exp(d) - d - 1) * ratio  # the KL weighted by the ratio (DeepSeek-V3.2)
        per_answer.append(term)
    if loss == "dapo":
        return sum(t.sum() for t in per_answer) / sum(len(t) for t in per_answer)
    if loss == "dr_grpo":
        return sum(t.sum() for t in per_answer) / (len(per_answer) * MAX_ANSWER)
    return sum(t.mean() for t in per_answer) / len(per_answer)


def test_group_advantages_by_hand():
    rewards = torch.tensor(REWARDS)
    advantages, std = group_advantages(rewards, GROUP)
    for g in range(2):
        group = REWARDS[g * GROUP:(g + 1) * GROUP]
        mean = sum(group) / GROUP
        sd = math.sqrt(sum((r - mean) ** 2 for r in group) / (GROUP - 1))  # Bessel-corrected
        assert std[g] == pytest.approx(sd, rel=1e-6)
        for k, r in enumerate(group):
            assert advantages[g * GROUP + k] == pytest.approx((r - mean) / (sd + 1e-4), rel=1e-5)
    unscaled, _ = group_advantages(rewards, GROUP, scale=False)
    assert unscaled[0] == pytest.approx(1.0 - 0.5, rel=1e-6)
    same, _ = group_advantages(torch.tensor([0.3] * 3), GROUP)
    assert torch.equal(same, torch.zeros(3))  # a group that all scores alike teaches nothing


def test_rewards_weighted_scalars_and_the_reference_metric():
    assert reference_metric('{"a": 1, "b": 2}', '{"a": 1, "b": 3}') == 0.5
    assert reference_metric("not json", '{"a": 1}') == 0.0
    assert scalar({"reward": 0.25, "other": 9}, "s") == 0.25 and scalar({"x": 1, "y": 0}, "s") == 0.5
    rewards = Rewards(["tunesmith.objectives.rewards:reference_metric", "tunesmith.eval.metrics:token_f1"], [2.0, 1.0])
    totals, each = rewards.score(['{"a": 1}'], ['{"a": 1}'])
    assert each["reference_metric"] == [1.0] and totals == [2.0 + each["token_f1"][0]]


def test_the_reference_metric_scores_the_answer_after_its_reasoning():
    """A long <think> block outweighed the answer: the right answer after reasoning scored below a
    wrong one without it, and JSON after reasoning was no JSON at all."""
    thought = "<think>" + "let me weigh the options one by one " * 10 + "</think>\n\n"
    assert reference_metric(thought + "the capital is Paris", "the capital is Paris") == 1.0
    assert reference_metric(thought + "the capital is Paris", "the capital is Lyon") < 1.0
    assert reference_metric(thought + '{"a": 1}', '{"a": 1}') == 1.0
    assert reference_metric("The capital is Paris", "<think>easy</think>The capital is Paris") == 1.0


def test_scorers_sharing_a_function_name_keep_their_own_weights(tmp_path, monkeypatch):
    """Two modules' `score` functions: each its own column and weight (one overwrote the other, and the
    first weight went to the survivor)."""
    (tmp_path / "by_length.py").write_text("def score(answer, reference):\n    return float(len(answer))\n")
    (tmp_path / "always_one.py").write_text("def score(answer, reference):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = Rewards(["by_length:score", "always_one:score"], [0.0, 1.0])
    totals, each = rewards.score(["abc", "abcdef"], ["x", "x"])
    assert totals == [1.0, 1.0] and each == {"by_length:score": [3.0, 6.0], "always_one:score": [1.0, 1.0]}
    with pytest.raises(UserError, match="names a scorer twice"):
        Rewards(["by_length:score", "by_length:score"])


@pytest.mark.parametrize("fast,layout", [(True, PADDING_FREE), (False, PADDED)])
@pytest.mark.parametrize("beta,loss", [(0.05, "dapo"), (0.0, "dr_grpo"), (0.1, "grpo")])
def test_grpo_loss_equals_the_formula_and_trl(tiny_model_dir, tiny_tokenizer, tmp_path, fast, layout, beta, loss):
    pytest.importorskip("trl", reason="TRL (pip install -e '.[bench]') is the reference this test compares with")
    from trl import GRPOConfig, GRPOTrainer

    prompts, answers = fixed_batch(tiny_tokenizer)
    advantages, _ = group_advantages(torch.tensor(REWARDS), GROUP)
    mine = lora_model(load_model(str(tiny_model_dir)), seed=3, fast_paths=fast)
    plain = lora_model(load_model(str(tiny_model_dir)), seed=3, fast_paths=False)
    old = old_logps_for(plain, prompts, answers)

    objective = grpo(beta, loss, layout, tiny_tokenizer, mine)
    batch = objective.rollout_batch(prompts, answers, advantages, old_logps=torch.cat(old))
    terms, stats = objective.loss(mine, batch.tensors)
    ours = sum(value / batch.counts[key] for key, value in terms.items())
    ours.backward()
    ours = ours.detach()
    assert 0 < stats["clip_fraction"][0] < stats["clip_fraction"][1]  # some ratios, not all, were clipped

    expected = hand_loss(plain, prompts, answers, advantages, old, beta, loss)
    expected.backward()
    expected = expected.detach()
    assert float(ours) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    assert_same_gradients(gradients(plain), gradients(mine), 1e-4)

    # TRL's GRPOTrainer loss on the same inputs
    trl_model = lora_model(load_model(str(tiny_model_dir)), seed=3, fast_paths=False)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                      gradient_checkpointing=False, per_device_train_batch_size=6, num_generations=GROUP,
                      max_completion_length=MAX_ANSWER, beta=beta, epsilon=EPSILON, loss_type=loss,
                      temperature=TEMPERATURE)
    from datasets import Dataset

    trainer = GRPOTrainer(model=trl_model, reward_funcs=lambda prompts, completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "Repeat: alpha"}] * 6),
                          processing_class=tiny_tokenizer)
    if "ref" in trainer.model.peft_config:  # TRL's reference for an existing adapter; tunesmith's is the base
        trainer.model.delete_adapter("ref")
    trainer.current_gradient_accumulation_steps = 1
    pad = tiny_tokenizer.pad_token_id
    completion = torch.tensor([a + [pad] * (MAX_ANSWER - len(a)) for a in answers])
    completion_mask = torch.tensor([[1] * len(a) + [0] * (MAX_ANSWER - len(a)) for a in answers])
    prompt = torch.tensor(prompts)
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
              "completion_mask": completion_mask, "advantages": advantages,
              "old_per_token_logps": torch.stack([torch.cat([o, o.new_zeros(MAX_ANSWER - len(o))]) for o in old]),
              "num_items_in_batch": completion_mask.sum()}
    if beta:
        with torch.no_grad(), trainer.model.disable_adapter():
            inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, torch.cat([prompt, completion], 1), torch.cat([torch.ones_like(prompt), completion_mask], 1),
                MAX_ANSWER)
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()
    assert float(ours) == pytest.approx(float(theirs), rel=1e-4, abs=1e-7)
    assert_same_gradients(gradients(trainer.model), gradients(mine), 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_through_a_frozen_head_keep_no_logits_and_match_log_softmax(monkeypatch, dtype):
    """objectives/logps.py HeadTokenLogps (gradients of each row's log-prob computed in the
    forward, chunk by chunk) against log_softmax of the full logits divided by the temperature:
    the same log-probs and hidden-state gradients under per-token upstream gradients."""
    from tunesmith.objectives import logps

    monkeypatch.setattr(logps, "head_chunk", lambda vocab, device: 16)  # 40 rows: three chunks
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(600, 32, generator=generator).to(dtype)
    hidden = torch.randn(40, 32, generator=generator).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 600, (40,), generator=generator)
    upstream = torch.randn(40, generator=generator)
    fast = logps.HeadTokenLogps.apply(hidden, weight, targets, TEMPERATURE, dtype)
    (grad_fast,) = torch.autograd.grad(fast, hidden, upstream)
    logits = (hidden.float() @ weight.float().t()) / TEMPERATURE
    plain = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (grad_plain,) = torch.autograd.grad(plain, hidden, upstream)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert fast.dtype == torch.float32 and torch.allclose(fast, plain, rtol=tolerance, atol=tolerance)
    assert (grad_fast.float() - grad_plain).abs().max() / grad_plain.abs().max() < tolerance


def test_a_grpo_micro_batch_holds_batch_size_prompts_in_either_layout():
    """Padding-free steps are cut by a token budget counted on the examples' lengths; a GRPO example is a
    prompt trained as group_size answers, so its steps are cut by batch_size (all 8 prompts were one
    micro-batch of 32 answers)."""
    from tunesmith.data.prepare import Split
    from tunesmith.data.prompts import Prompt
    from tunesmith.training.step import optimizer_steps

    cfg = validate({"train": {"objective": "grpo", "batch_size": 2, "grad_accum": 4, "group_size": 4,
                              "max_completion_tokens": 64}, "data": {"max_seq_len": 512}})
    split = Split("train")
    split.encoded = [Prompt(list(range(40 + i))) for i in range(16)]
    for layout in (PADDED, PADDING_FREE):
        assert [len(batch) for batch in next(optimizer_steps(split, cfg, layout))] == [2, 2, 2, 2]


def test_the_clip_fraction_counts_the_ratios_the_clip_holds_back(monkeypatch):
    """clip_fraction: the share of answer tokens whose ratio the clip holds back, i.e. below 1 - eps
    with a negative advantage or above 1 + eps with a positive one (a ratio outside the range on the
    other side keeps its gradient). The TRL comparison above checks only that some, not all, were
    clipped. Ratios by hand: log-probs log(r) against old log-probs 0."""
    from tunesmith.objectives import grpo as module

    monkeypatch.setattr(module, "token_logps", lambda model, batch, temperature: batch["logps"])
    objective = grpo(0.0, "dapo", PADDED, SimpleNamespace(pad_token_id=0), None)
    ratios = [0.5, 1.5, 1.0, 0.5, 1.5, 0.5]  # eps 0.2: the range [0.8, 1.2]
    tensors = {"logps": torch.log(torch.tensor(ratios)), "old_logps": torch.zeros(6),
               "label_sequence": torch.tensor([0, 0, 0, 1, 1, 1]), "sequence_count": 2,
               "sequence_labels": torch.tensor([3.0, 3.0]), "advantages": torch.tensor([1.0, -1.0])}
    _, stats = objective.loss(None, tensors)
    # advantage +1: 0.5 kept, 1.5 clipped, 1.0 inside; advantage -1: 0.5 clipped, 1.5 kept, 0.5 clipped
    assert stats["clip_fraction"].tolist() == [3.0, 6.0]


def test_grpo_evaluation_is_minus_the_mean_reward_of_greedy_answers(tmp_path, monkeypatch):
    """The validation figure is minus the mean reward (lower is better, as for a loss, so early
    stopping and best-checkpoint selection keep the highest reward). Sampling and decoding are
    stand-ins: answers of 2 and 4 tokens, a scorer giving length / 4, so rewards 0.5 and 1.0."""
    from tunesmith.data.prepare import Split
    from tunesmith.data.prompts import Prompt
    from tunesmith.objectives import grpo as module

    (tmp_path / "quarter_length.py").write_text("def score(answer, reference):\n    return len(answer) / 4\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    asked = []

    def sample(model, prompts, copies, max_new_tokens, temperature, pad_id, stops, batch_size):
        asked.append((prompts, copies, temperature))
        return [[7] * 2, [7] * 4]

    monkeypatch.setattr(module, "sample", sample)
    monkeypatch.setattr(module, "stop_ids", lambda tokenizer, model: [])
    decoder = SimpleNamespace(decode=lambda ids, skip_special_tokens: "x" * len(ids))
    cfg = validate({"train": {"objective": "grpo", "group_size": GROUP, "max_completion_tokens": MAX_ANSWER,
                              "rewards": ["quarter_length:score"]}})
    objective = GRPO(cfg, None, PADDED, 0, decoder)
    split = Split("validation", encoded=[Prompt([1, 2], "a"), Prompt([3, 4], "b")])
    assert objective.evaluate(None, split, batch_size=2) == pytest.approx(-(0.5 + 1.0) / 2)
    assert asked == [([[1, 2], [3, 4]], 1, None)]  # one greedy answer per prompt


def test_reward_std_is_the_mean_of_the_groups_spreads():
    """reward/<name>/std is recorded as (sum of each group's Bessel-corrected std, number of groups):
    groups [1, 0, 0.5] (std 0.5) and [0.2, 0.2, 0.9] (std 0.7 / sqrt(3)); the mean as (sum, count)."""
    from tunesmith.objectives.grpo import _reward_stats

    stats = _reward_stats(REWARDS, {"judge": [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]}, GROUP)
    total, groups = stats["reward/total/std"]
    assert groups == 2 and total == pytest.approx(0.5 + 0.7 / math.sqrt(3), rel=1e-6)
    assert stats["reward/total/mean"] == pytest.approx((2.8, 6.0))
    assert stats["reward/judge/std"] == pytest.approx((math.sqrt(1 / 3), 2.0))  # [0, 0, 1]: var 1/3; [1, 1, 1]: 0


def test_answers_cut_at_max_completion_tokens_are_counted_and_warned_of_once(tmp_path, monkeypatch, capsys):
    """Answers that ran to max_completion_tokens without a stop token had their cut text rewarded with
    no word of it (a walk-through's run: 22.5 tokens of 24 on average). Stand-ins: the stop token is 9;
    answers of MAX_ANSWER tokens without it are cut, one ending with it or shorter is not."""
    from tunesmith.data.prompts import Prompt
    from tunesmith.objectives import grpo as module

    (tmp_path / "one.py").write_text("def score(answer, reference):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    batches = iter([[[7] * MAX_ANSWER, [7] * (MAX_ANSWER - 1) + [9], [7] * 2] * 2,  # 2 of 6 cut: no warning
                    [[7] * MAX_ANSWER, [7] * MAX_ANSWER, [7] * 2] * 2,  # 4 of 6: warned
                    [[7] * MAX_ANSWER] * 6])  # 6 of 6: counted, not warned again
    monkeypatch.setattr(module, "sample", lambda *args: next(batches))
    monkeypatch.setattr(module, "stop_ids", lambda tokenizer, model: [9])
    decoder = SimpleNamespace(decode=lambda ids, skip_special_tokens: "x" * len(ids))
    cfg = validate({"train": {"objective": "grpo", "group_size": GROUP, "max_completion_tokens": MAX_ANSWER,
                              "rewards": ["one:score"]}})
    objective = GRPO(cfg, None, PADDED, 0, decoder)
    prompts = [Prompt([1, 2], "a"), Prompt([3, 4], "b")]
    cuts = [objective.batch(prompts).stats["completion_cut"] for _ in range(3)]
    assert cuts == [(2.0, 6.0), (4.0, 6.0), (6.0, 6.0)]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert f"warning: 4 of 6 sampled answers reached train.max_completion_tokens ({MAX_ANSWER}) without ending" in err


def test_sampled_answers_keep_their_end_of_turn_and_drop_what_follows():
    """A rollout ends at its first stop token and keeps it (it carries a label, so the policy learns to
    stop, as in SFT); the padding generate writes after it is no part of the answer."""
    from tunesmith.objectives.rollout import sample

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kwargs):  # answers: stopped, stopped at the other stop id, cut
            tails = [[7, 8, 2, 0, 0], [9, 3, 0, 0, 0], [7, 7, 7, 7, 7]]
            return torch.cat([input_ids, torch.tensor(tails[:len(input_ids)])], 1)

    model = Model().train()
    answers = sample(model, [[4, 5], [6]], copies=1, max_new_tokens=5, temperature=None, pad_id=0, stops=[2, 3])
    assert answers == [[7, 8, 2], [9, 3]] and model.training
    assert sample(Model(), [[4]] * 3, 1, 5, None, 0, [2, 3])[2] == [7, 7, 7, 7, 7]  # no stop: cut at max_new_tokens


def test_the_progress_line_shows_the_mean_reward_of_the_last_step(tmp_path, monkeypatch):
    """GRPO's progress line gave its policy loss alone, which says little of whether answers improve."""
    (tmp_path / "one.py").write_text("def score(answer, reference):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = validate({"train": {"objective": "grpo", "group_size": GROUP, "rewards": ["one:score"]}})
    objective = GRPO(cfg, None, PADDED, 0, SimpleNamespace())
    assert objective.shown() == {}  # before any step
    # a step's statistics as fit reads them: the rewards' (sum, count) known on the host, kl's read from the device
    objective._unread = (["kl"], None, {"reward/total/mean": (3.0, 4.0)})
    objective.settle([0.2, 4.0])
    assert objective.shown() == {"reward": 0.75}


def test_every_objective_takes_the_ranks_where_a_run_prepares_it():
    """api._train calls objective.prepare(model, splits, ranks) whatever the objective (GRPO's took no
    ranks: every GRPO run failed at its start, and only the slow set runs one)."""
    import inspect

    from tunesmith.objectives import dpo, kto, orpo, simpo
    from tunesmith.training import distributed

    for objective in (dpo.DPO, kto.KTO, orpo.ORPO, simpo.SimPO, GRPO):
        inspect.signature(objective.prepare).bind(object(), object(), [], distributed.SINGLE)  # TypeError if not


def test_a_reward_dict_holding_none_or_text_is_one_line():
    """{'correct': None} ended the run in a TypeError traceback (sum of the values)."""
    for value in ({"correct": None}, {"a": 1.0, "b": "high"}):
        with pytest.raises(UserError, match=r"reward s: returned .*; expected a finite number"):
            scalar(value, "s")


def test_grpo_without_rewards_refuses_a_prompt_without_a_reference_before_the_model_loads(tiny_tokenizer, tmp_path):
    """The built-in reward scores against references: a prompt without one stopped the run at the step
    that first sampled it (step 2, after a step had trained), or never, by its place in the order."""
    from helpers import write_jsonl
    from tunesmith.objectives import prepare_data

    rows = [{"prompt": f"Say {i}", "reference": str(i)} for i in range(6)] + [{"prompt": "Say nothing"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg = validate({"data": {"train": str(path), "cache": False}, "train": {"objective": "grpo"}})
    with pytest.raises(UserError, match=r"prompts.jsonl:7: a prompt without a reference \(1 in (train|validation)\)"):
        prepare_data(cfg, tiny_tokenizer)
    cfg = validate({"data": {"train": str(path), "cache": False},
                    "train": {"objective": "grpo", "rewards": ["tunesmith.eval.metrics:token_f1"]}})
    assert len(prepare_data(cfg, tiny_tokenizer).splits["train"]) >= 5
