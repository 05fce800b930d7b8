"""Preference and reward objectives through the whole training path: resume after kill -9 gives the
uninterrupted run's weights (DPO, GRPO), accumulation does not change DPO's gradients, a run
starts from an earlier run (its reference is that run's model), full fine-tuning keeps a frozen
reference copy, and the objectives' statistics reach metrics.jsonl and the report."""
from __future__ import annotations

import json
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers import (assert_same_gradients, gradients, lora_model, qa_rows, records, run_cli, start_and_kill_at,
                     write_jsonl)
from tunesmith.config import validate

STEPS = 6
SCORER = '''
def reward(prediction, reference):
    """Varies between sampled answers, so advantages are not all zero."""
    return (len(prediction) % 5) / 4 + (0.5 if reference.split()[0] in prediction else 0.0)
'''


def pair_rows(n=32):
    """helpers.qa_rows as pairs: the right answer chosen, another prompt's answer rejected."""
    rows = qa_rows(n)
    return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[i - 1]["completion"]}
            for i, r in enumerate(rows)]


def write_run_config(tmp_path, model_dir, run, objective, **train):
    if objective == "grpo":
        rows = [{"prompt": r["prompt"], "reference": r["chosen"]} for r in pair_rows(12)]
        (tmp_path / "scorer.py").write_text(SCORER)
        train = {"rewards": [f"{tmp_path / 'scorer.py'}:reward"], "group_size": 3, "max_completion_tokens": 8,
                 "batch_size": 2, "grad_accum": 1, "beta": 0.04, **train}
    else:
        rows = pair_rows() if objective != "kto" else [
            {"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
            for i, r in enumerate(pair_rows())]
        train = {"batch_size": 4, "grad_accum": 2, **train}
    data = write_jsonl(tmp_path / f"{objective}.jsonl", rows)
    config = {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "data": {"train": str(data), "max_seq_len": 96, "validation_share": 0.2},
        "adapter": {"r": 4, "dropout": 0.1},  # dropout on: the RNG state must be restored too
        # fast paths off: no compiling (the shapes of sampled answers vary); they are checked against TRL elsewhere
        "train": {"objective": objective, "max_steps": STEPS, "lr": 1e-2, "log_every": 1, "checkpoint_every": 1,
                  "keep_checkpoints": 2, "log_sample_ids": True, "warmup_ratio": 0.0, "fast_paths": "off", **train},
        "eval": {"generate": False},
        "output": {"dir": str(tmp_path / run)},
    }
    path = tmp_path / f"{run}.json"
    path.write_text(json.dumps(config))
    return path


def adapter_weights(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_resume_after_kill_gives_the_uninterrupted_weights(tiny_model_dir, tmp_path, objective):
    # On the CPU: the weights are compared with torch.equal, which CUDA's attention and reduction
    # kernels need not repeat bit for bit from one run to the next.
    whole = write_run_config(tmp_path, tiny_model_dir, "whole", objective, device="cpu")
    done = run_cli(whole, timeout=900)
    assert done.returncode == 0, done.stderr
    expected = adapter_weights(tmp_path / "whole")
    assert any(float(v.abs().max()) > 0 for k, v in expected.items() if "lora_B" in k)  # it learned something

    killed = write_run_config(tmp_path, tiny_model_dir, "killed", objective, device="cpu")
    run = tmp_path / "killed"
    assert start_and_kill_at(killed, run, 3) == -signal.SIGKILL
    resumed = run_cli(killed, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    got = adapter_weights(run)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    samples = [i for r in records(run, "samples") for i in r["ids"]]
    assert samples == [i for r in records(tmp_path / "whole", "samples") for i in r["ids"]]  # no gaps, no repeats


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
def test_grpo_statistics_reach_the_metrics_and_the_report(tiny_model_dir, tmp_path):
    done = run_cli(write_run_config(tmp_path, tiny_model_dir, "run", "grpo", max_steps=2, checkpoint_every=0))
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    train = records(run, "train")
    for key in ("reward/reward/mean", "reward/reward/std", "reward/total/mean", "kl", "completion_length",
                "clip_fraction"):
        assert all(f"objective/{key}" in r for r in train), key
    assert 0 < train[0]["objective/completion_length"] <= 8
    # the progress line gives the mean reward beside the loss (a policy loss alone says little of progress)
    shown = re.search(r"train 2/2 \| loss \S+ \| lr \S+ \| tok/s \d+ \| reward (\S+) \|", done.stderr)
    assert shown and float(shown.group(1)) == pytest.approx(train[-1]["objective/reward/total/mean"], abs=1e-3), done.stderr
    evals = records(run, "eval")
    assert evals and evals[-1]["eval_loss"] <= 0  # minus the mean reward of greedy answers
    assert not any("perplexity" in r for r in evals)  # exp(-reward) would mean nothing
    assert "eval_loss: minus the mean reward of greedy answers" in done.stdout + done.stderr  # said under the table
    report = json.loads((run / "report.json").read_text())
    assert "objective/kl" in report["curves"]["train"][0]
    assert "objective" in (run / "report.html").read_text()


@pytest.mark.parametrize("sft_weight", [0.0, 0.8])
def test_dpo_gradients_do_not_depend_on_accumulation(tiny_model_dir, tiny_tokenizer, tmp_path, sft_weight):
    """Batch 4 x accumulation 1 and batch 1 x accumulation 4: the same step gradient (each pair's
    loss divided by the step's pairs, the SFT term by the step's chosen tokens, not per micro-batch)."""
    from tunesmith.data.preference import PAIRS, prepare_preference
    from tunesmith.data.collate import PADDING_FREE
    from tunesmith.models import load_model
    from tunesmith.objectives.dpo import DPO
    from tunesmith.objectives.logps import Reference

    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    cfg = validate({"data": {"train": str(path), "validation": str(path)},
                    "train": {"objective": "dpo", "beta": 0.5, "sft_weight": sft_weight}})
    split = prepare_preference(cfg.data, tiny_tokenizer, PAIRS).splits["train"]
    assert len({pair.chosen.label_count for pair in split.encoded}) > 1  # per-batch means would differ
    results = []
    for layout in ([[0, 1, 2, 3]], [[0], [1], [2], [3]]):
        model = lora_model(load_model(str(tiny_model_dir)), seed=1)
        objective = DPO(cfg, Reference(model), PADDING_FREE, tiny_tokenizer.pad_token_id)
        from tunesmith.training.distributed import StepLoss

        loss, _ = objective.train_step(StepLoss(model, objective.loss), split, layout, tiny_tokenizer.pad_token_id)
        results.append((float(loss), gradients(model), objective.last_metrics))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert_same_gradients(results[0][1], results[1][1], 1e-5)
    assert results[0][2]["rewards/margin"] == pytest.approx(results[1][2]["rewards/margin"], rel=1e-5, abs=1e-7)
    assert ("nll" in results[0][2]) == bool(sft_weight)


@pytest.mark.parametrize("precompute", [False, True])
def test_kto_gradients_and_eval_loss_do_not_depend_on_how_the_step_is_cut(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                           precompute):
    """KTO's reference point z (the mean log-ratio of the mismatched answers) over the whole step: it
    was estimated per micro-batch, so 6 x 1 and 1 x 6 gave gradients 115% apart (a reviewer's
    reproduction). The eval loss likewise over the split, whatever its batch size."""
    from tunesmith.data.collate import PADDING_FREE
    from tunesmith.data.preference import UNPAIRED, prepare_preference
    from tunesmith.models import load_model
    from tunesmith.objectives.kto import KTO
    from tunesmith.objectives.logps import Reference
    from tunesmith.training.distributed import StepLoss

    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"] * (1 + i % 4),
             "label": bool(i % 3)} for i, r in enumerate(pair_rows(6))]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    cfg = validate({"data": {"train": str(path), "validation": str(path)},
                    "train": {"objective": "kto", "beta": 0.5, "precompute_ref": precompute}})
    results = []
    for cut in ([list(range(6))], [[i] for i in range(6)], [[0, 1, 2], [3, 4, 5]]):
        split = prepare_preference(cfg.data, tiny_tokenizer, UNPAIRED).splits["train"]
        model = lora_model(load_model(str(tiny_model_dir)), seed=5)
        objective = KTO(cfg, Reference(model), PADDING_FREE, tiny_tokenizer.pad_token_id)
        objective.prepare(model, [split])
        evaluated = objective.evaluate(model, split, batch_size=len(cut[0]))
        loss, _ = objective.train_step(StepLoss(model, objective.loss), split, cut, tiny_tokenizer.pad_token_id)
        results.append((float(loss), gradients(model), objective.last_metrics["kl"], evaluated))
    assert results[0][2] > 0.01  # z not clamped to 0: its scope matters
    for other in results[1:]:
        assert other[0] == pytest.approx(results[0][0], rel=1e-5)
        assert_same_gradients(results[0][1], other[1], 1e-4)
        assert other[2] == pytest.approx(results[0][2], rel=1e-5)
        assert other[3] == pytest.approx(results[0][3], rel=1e-5)


def test_the_logged_nll_is_the_one_in_the_loss_and_ipo_rewards_are_per_token(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                             capsys):
    """objective/nll of ORPO and of DPO with sft_weight: the loss's NLL term, per chosen token of the
    step (it was a mean of per-pair means: 6.3306 logged against 6.2935 in the loss). IPO's rewards
    from its per-token log-ratios, as its loss and TRL take them. LoRA dropout beside a reference is
    warned of (TRL turns it off)."""
    from tunesmith import methods
    from tunesmith.data.collate import PADDED
    from tunesmith.data.preference import PAIRS, prepare_preference
    from tunesmith.models import load_model
    from tunesmith.objectives import build
    from tunesmith.objectives.logps import per_sequence, token_logps

    rows = [dict(r, chosen=r["chosen"] * (1 + 5 * (i % 2))) for i, r in enumerate(pair_rows(4))]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    model = lora_model(load_model(str(tiny_model_dir)), seed=3)
    for objective, extra, weight in (("orpo", {}, 1.0), ("dpo", {"sft_weight": 0.5}, 0.5),
                                     ("dpo", {"dpo_loss": "ipo", "dropout": 0.1}, 0.0)):
        dropout = extra.pop("dropout", 0.0)
        cfg = validate({"data": {"train": str(path), "validation": str(path)}, "adapter": {"dropout": dropout},
                        "train": {"objective": objective, "beta": 0.2, **extra}})
        split = prepare_preference(cfg.data, tiny_tokenizer, PAIRS).splits["train"]
        assert len({pair.chosen.label_count for pair in split.encoded}) > 1  # per-pair means would differ
        built = build(cfg, model, tiny_tokenizer, methods.get("lora"), torch.device("cpu"), PADDED)
        assert ("adapter.dropout 0.1 with train.objective dpo" in capsys.readouterr().err) == bool(dropout)
        tensors = built.batch(split.encoded).tensors
        model.eval()  # no dropout: the hand computation below sees the same log-probs
        terms, stats = built.loss(model, tensors)
        n = len(split.encoded)
        logps = per_sequence(token_logps(model, tensors), tensors).detach()
        tokens = tensors["sequence_labels"].float()
        if weight:
            nll = -logps[:n].sum() / tokens[:n].sum()
            assert float(stats["nll"][0] / stats["nll"][1]) == pytest.approx(float(nll), rel=1e-5)
            assert float(terms["chosen_tokens"]) / tokens[:n].sum() == pytest.approx(float(weight * nll), rel=1e-5)
        else:
            with model.disable_adapter():
                reference = per_sequence(token_logps(model, tensors), tensors)
            per_token = (logps - reference) / tokens
            assert float(stats["rewards/chosen"][0]) / n == pytest.approx(float(0.2 * per_token[:n].mean()), rel=1e-4)
        model.train()


def test_precomputed_reference_log_probs_on_the_models_device(tiny_model_dir, tiny_tokenizer, tmp_path):
    """train.precompute_ref, before training, with the model where a run puts it (train.device auto: a
    GPU where there is one): the host-built batches reach the model's device, and each pair gets the
    log-probs the reference gives it during training; over ranks, each computes its share only."""
    from tunesmith.data.collate import PADDED
    from tunesmith.data.preference import PAIRS, prepare_preference
    from tunesmith.device import resolve
    from tunesmith.models import load_model
    from tunesmith.objectives.base import on_device
    from tunesmith.objectives.dpo import DPO
    from tunesmith.objectives.logps import Reference
    from tunesmith.training import distributed

    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(5))
    settings = {"data": {"train": str(path), "validation": str(path)},
                "train": {"objective": "dpo", "batch_size": 2, "precompute_ref": True}}
    split = prepare_preference(validate(settings).data, tiny_tokenizer, PAIRS).splits["train"]
    device = resolve("auto")
    model = lora_model(load_model(str(tiny_model_dir), device=device), seed=1, fast_paths=False)
    DPO(validate(settings), Reference(model), PADDED, tiny_tokenizer.pad_token_id).prepare(model, [split])
    stored = [pair.reference for pair in split.encoded]  # [chosen, rejected] per pair
    assert len(stored) == 5 and all(reference is not None for reference in stored)
    settings["train"]["precompute_ref"] = False
    live = DPO(validate(settings), Reference(model), PADDED, tiny_tokenizer.pad_token_id)
    for pair in split.encoded:
        pair.reference = None
    expected = live.reference_logps(model, on_device(live.batch(split.encoded).tensors, device)).tolist()
    assert [v for reference in stored for v in reference] == pytest.approx(  # expected: all chosen, then all rejected
        [v for both in zip(expected[:5], expected[5:]) for v in both], rel=1e-5)

    # Two ranks (here one after the other): each computes every second batch of 2 pairs and receives the
    # other's through Ranks.gather; every rank computed all 5 before.
    class Rank(distributed.Ranks):
        def gather(self, value):
            parts[self.rank] = value
            return parts

    class Counted(DPO):
        def batch(self, examples, key=None):
            asked[-1].append(len(examples))  # the pairs this rank computes
            return super().batch(examples, key)

    parts, asked = [{}, {}], []
    settings["train"]["precompute_ref"] = True
    for rank in (0, 1):
        own = prepare_preference(validate(settings).data, tiny_tokenizer, PAIRS).splits["train"]
        asked.append([])
        Counted(validate(settings), Reference(model), PADDED, tiny_tokenizer.pad_token_id).prepare(model, [own],
                                                                                                 Rank(rank, 2, rank))
    assert asked == [[2, 1], [2]]  # pairs 0-1 and 4 on rank 0, 2-3 on rank 1
    assert [pair.reference for pair in own.encoded] == stored  # rank 1 got rank 0's: the same batches, the same figures


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
def test_dpo_from_an_sft_run_takes_that_run_as_reference(tiny_model_dir, tmp_path):
    """model: RUN merges the SFT run's adapter once; the new adapter starts at zero, so the first step's
    policy is the reference: DPO's loss is exactly log 2 and every implicit reward 0."""
    sft = {"model": {"name": str(tiny_model_dir), "dtype": "float32"},
           "data": {"train": str(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                                                      for r in pair_rows()])), "max_seq_len": 96},
           "adapter": {"r": 4}, "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2},
           "eval": {"generate": False}, "output": {"dir": str(tmp_path / "sft")}}
    (tmp_path / "sft.json").write_text(json.dumps(sft))
    assert run_cli(tmp_path / "sft.json").returncode == 0
    path = write_run_config(tmp_path, tmp_path / "sft", "dpo", "dpo", max_steps=2, checkpoint_every=0)
    done = run_cli(path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "sft" / "export" / "merged" / "merge_check.json").is_file()
    first = records(tmp_path / "dpo", "train")[0]
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert first["objective/rewards/chosen"] == 0 and first["objective/rewards/rejected"] == 0
    saved = (tmp_path / "dpo" / "config.yaml").read_text()
    assert "export/merged" in saved


def test_full_fine_tuning_keeps_a_frozen_reference_copy(tiny_model_dir, tmp_path):
    path = write_run_config(tmp_path, tiny_model_dir, "full", "dpo", max_steps=3, checkpoint_every=0)
    config = json.loads(path.read_text())
    config["adapter"] = {"method": "full"}
    path.write_text(json.dumps(config))
    done = run_cli(path)
    assert done.returncode == 0, done.stderr
    losses = [r["loss"] for r in records(tmp_path / "full", "train")]
    assert losses[0] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == reference copy at the start
    assert losses[-1] < losses[0]  # the reference stayed where it was while the policy moved
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    accuracy = [results[model]["validation_pair_accuracy"] for model in ("base", "fine_tuned")]
    assert all(0 <= a <= 1 for a in accuracy) and "validation_pair_accuracy" in done.stderr


def test_pair_accuracy_is_the_share_of_pairs_whose_chosen_answer_is_likelier_per_token(tiny_model_dir, tiny_tokenizer,
                                                                                        tmp_path):
    """validation_pair_accuracy, by hand: each answer's mean log-probability per label token from the
    model's own logits; a pair counts 1 where the chosen answer's is higher, 1/2 where they are equal."""
    from tunesmith.data.collate import PADDED
    from tunesmith.data.preference import PAIRS, prepare_preference
    from tunesmith.models import load_model
    from tunesmith.objectives.dpo import DPO
    from tunesmith.objectives.logps import Reference

    rows = pair_rows(7)
    rows[3]["rejected"] = rows[3]["chosen"] + " "  # the same answer tokens either way: a tie
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    settings = validate({"data": {"train": str(path), "validation": str(path)}, "train": {"objective": "dpo"}})
    split = prepare_preference(settings.data, tiny_tokenizer, PAIRS).splits["validation"]
    model = lora_model(load_model(str(tiny_model_dir)), seed=1, fast_paths=False)

    def mean_logp(encoded) -> float:
        ids, labels = torch.tensor([encoded.input_ids]), torch.tensor(encoded.labels[1:])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        kept = labels != -100
        return float(logps[kept].gather(1, labels[kept, None]).mean())

    scores = [(mean_logp(p.chosen), mean_logp(p.rejected)) for p in split.encoded]
    expected = sum(1.0 if c > r + 1e-6 else 0.5 if abs(c - r) <= 1e-6 else 0.0 for c, r in scores) / len(scores)
    objective = DPO(settings, Reference(model), PADDED, tiny_tokenizer.pad_token_id)
    assert objective.held_out_figures(model, split, batch_size=3) == {"validation_pair_accuracy": expected}
    assert 0 < expected < 1 and model.training  # both outcomes among the pairs; the model left as it was


def test_ci_installs_trl_before_the_tests():
    """The TRL parity tests skip without TRL: .ci/run installs the bench extra before `make test`."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert '.[bench]' in text and text.index('.[bench]') < text.index("make test")


@pytest.mark.slow  # moved out of `make test` (10-minute budget); runs in .ci/run's slow set
@pytest.mark.parametrize("objective,shared,batch,precompute", [
    ("dpo", "rewards/margin", 4, False), ("kto", "kl", 4, False), ("dpo", "rewards/margin", 1, False),
    ("dpo", "rewards/margin", 4, True)])
def test_preferences_on_two_ranks_equal_one_process(tiny_model_dir, tmp_path, objective, shared, batch, precompute):
    """DDP over two gloo processes gives the weights of one process with the same global batch (each
    pair's loss divided by the step's pairs over both ranks; KTO's reference point over both ranks'
    mismatched answers). Batch 1: one rank has no pair in any micro-batch (its statistics' sums had
    another size than the other rank's: gloo refused them). train.precompute_ref: each rank computes
    half the reference log-probs and receives the other half."""
    from test_distributed import max_diff, train, weights

    paths = []
    # On the CPU (gloo), as in tests/test_distributed.py: two ranks on one GPU would ask for cuda:1.
    for run in ("one", "two"):
        path = write_run_config(tmp_path, tiny_model_dir, run, objective, max_steps=3, checkpoint_every=0,
                                device="cpu", batch_size=batch, precompute_ref=precompute)
        config = json.loads(path.read_text())
        config["adapter"]["dropout"] = 0.0  # each rank draws its own dropout masks
        path.write_text(json.dumps(config))
        paths.append(path)
    assert train(paths[0], timeout=900).returncode == 0
    done = train(paths[1], nproc=2, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5
    figures = [[r[f"objective/{shared}"] for r in records(tmp_path / run, "train")] for run in ("one", "two")]
    assert figures[0] == pytest.approx(figures[1], abs=1e-5)  # the statistics are over both ranks' examples


@pytest.mark.slow
def test_grpo_on_two_ranks_with_one_prompt_per_micro_batch_finishes(tiny_model_dir, tmp_path):
    """train.batch_size 1 on two ranks: one rank samples no prompt of its own; it hung in the step's
    sums (the other rank's held its rewards' statistics). Its samples differ from one process's, as
    each rank samples its own prompts, so only the finish and the records are checked."""
    from test_distributed import train

    path = write_run_config(tmp_path, tiny_model_dir, "two", "grpo", max_steps=2, checkpoint_every=0, device="cpu",
                            batch_size=1)
    done = train(path, nproc=2, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(records(tmp_path / "two", "train")) == 2
