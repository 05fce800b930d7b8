"""Early stopping, the best weights restored, and the overfitting alarm."""
import json
import math
from pathlib import Path

import pytest
import torch

import tunesmith
from tunesmith import api
from tunesmith.training.checkpoint import trainable_state
from tunesmith.training.early_stop import BestWeights, EarlyStopping, overfitting


def test_early_stopping_counts_evaluations_without_enough_improvement():
    stop = EarlyStopping(patience=2, min_delta=0.05)
    decisions = [stop(step, value) for step, value in [(1, 3.0), (2, 2.5), (3, 2.48), (4, 2.47)]]
    # 2.48 and 2.47 improve on 2.5 by less than min_delta: two bad evaluations, stop at step 4.
    assert decisions == [False, False, False, True]
    assert (stop.best, stop.best_step, stop.stopped_at) == (2.5, 2, 4)
    again = EarlyStopping(patience=2)
    assert [again(s, v) for s, v in [(1, 2.0), (2, 2.1), (3, 1.9), (4, 2.0), (5, 1.95)]] == [False, False, False, False, True]
    # A run resumed from a checkpoint (its state, as state.json keeps it) stops where the uninterrupted one does:
    # the evaluations without improvement before the checkpoint count.
    before = EarlyStopping(patience=3)
    assert [before(s, v) for s, v in [(1, 2.0), (2, 2.1), (3, 2.2)]] == [False, False, False]
    resumed = EarlyStopping(patience=3)
    resumed.restore(json.loads(json.dumps(before.state())))
    assert resumed(4, 2.3) and (resumed.best, resumed.best_step, resumed.stopped_at) == (2.0, 1, 4)


def test_overfitting_needs_rising_eval_and_falling_train_loss():
    falling = [3.0 - 0.1 * i for i in range(30)]
    rising_eval = [(10, 1.0), (20, 1.1), (30, 1.2)]
    assert overfitting(falling, rising_eval)
    assert not overfitting(falling, [(10, 1.0), (20, 1.1), (30, 1.05)])  # eval not rising every time
    assert not overfitting(list(reversed(falling)), rising_eval)  # training loss rising too: not overfitting
    assert not overfitting(falling, rising_eval[:2])
    # between evaluations at steps 2, 4 and 6 the training losses are steps 3-4's and 5-6's (losses[i] is step
    # i + 1's): means 2.0 then 5.0, rising; steps 4-5's and 6's (5.5, then 1.0) would have read as falling
    assert not overfitting([0, 0, 2, 2, 9, 1], [(2, 1.0), (4, 1.1), (6, 1.2)])


def test_best_weights_round_trip_on_disk_and_in_memory(tmp_path):
    model = torch.nn.Linear(3, 2)
    for keeper in (BestWeights(tmp_path / "best.safetensors"), BestWeights()):
        assert keeper.offer(model, 1, 2.0)
        kept = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.weight.add_(1.0)
        assert not keeper.offer(model, 2, 2.5)  # worse: the kept weights stay
        keeper.restore(model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())
    reopened = BestWeights.reopen(tmp_path / "best.safetensors", 1, 2.0)
    assert reopened.step == 1
    assert BestWeights.reopen(tmp_path / "best.safetensors", 7, 1.0).step is None  # a file from another step


def test_best_weights_a_checkpoint_knows_survive_a_better_evaluation_after_it(tmp_path):
    """Checkpoint at step 2 with the best at step 2; a better evaluation at step 3; a crash before the
    next checkpoint. The resumed run starts from step 2, whose best weights the step-3 file replaced:
    they are kept beside it until a checkpoint knows the new best."""
    path = tmp_path / "best.safetensors"
    model = torch.nn.Linear(3, 2)
    keeper = BestWeights(path)
    keeper.offer(model, 2, 2.0)
    at_two = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    keeper.offer(model, 3, 1.0)  # better, after the checkpoint at step 2
    reopened = BestWeights.reopen(path, 2, 2.0)  # the crash, the resume from step 2
    assert (reopened.step, reopened.value) == (2, 2.0)
    reopened.restore(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in at_two.items())
    reopened.offer(model, 3, 1.5)
    reopened.committed()  # the checkpoint at step 4 knows step 3's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]


def scripted_eval(monkeypatch, values):
    """Replace the evaluations of the run's weights by a scripted sequence (the base model's
    evaluation before training stays real); remember the weights at each call."""
    seen = []
    real = api.eval_loss

    def fake(model, split, batch_size, pad_id, ranks, loss_module, layout, label):
        if label.endswith("(base)"):
            return real(model, split, batch_size, pad_id, ranks, loss_module, layout, label)
        seen.append({k: v for k, v in trainable_state(model).items()})
        return values[len(seen) - 1]

    monkeypatch.setattr(api, "eval_loss", fake)
    return seen


def lora_weights(run_dir):
    from tunesmith.runs import load_trained

    model, _, _ = load_trained(run_dir, dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def same_weights(loaded, snapshot):
    assert set(loaded) == set(snapshot)
    return all(torch.equal(loaded[n], snapshot[n]) for n in loaded)


def test_an_older_checkpoint_resumed_past_a_damaged_one_still_has_its_best_weights(tiny_config, monkeypatch, capsys):
    """Best at step 1, then at step 2; checkpoints at both; a crash in step 3. The step-2 checkpoint
    does not read back, so the run resumes from step 1, whose best weights the step-2 checkpoint's
    commit had deleted: they are kept while a checkpoint that needs them is, and the damaged
    checkpoint is moved aside so that step 2 is saved again."""
    first = scripted_eval(monkeypatch, [2.0, 1.0])  # a third evaluation (step 3) fails: the crash
    tiny_config["train"].update(max_steps=4, checkpoint_every=1, keep_checkpoints=3)
    tiny_config["eval"].update(every_steps=1, generate=False, report=False)
    with pytest.raises(IndexError):
        tunesmith.train(tiny_config)
    run = Path(tiny_config["output"]["dir"])
    blob = run / "checkpoints" / "step-00000002" / "trainable.safetensors"
    blob.write_bytes(blob.read_bytes()[:100])
    scripted_eval(monkeypatch, [2.5, 2.6, 2.7])  # steps 2-4 again: none beats step 1's 2.0
    results = tunesmith.train(tiny_config)
    assert "skipping damaged checkpoint step-00000002 (moved to damaged-step-00000002-" in capsys.readouterr().err
    assert results["resumed_from"] == 1 and results["best_step"] == 1 and results["restored_best"]
    assert same_weights(lora_weights(run), first[0])
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == [f"step-0000000{i}" for i in (2, 3, 4)]
    assert len(list((run / "checkpoints").glob("damaged-step-00000002-*"))) == 1


def test_early_stop_at_the_right_step_and_best_weights_restored(tiny_config, monkeypatch, capsys):
    seen = scripted_eval(monkeypatch, [3.0, 2.5, 2.0, 2.1, 2.05, 1.0, 1.0])
    tiny_config["train"]["max_steps"] = 10
    tiny_config["eval"].update(every_steps=1, patience=2, generate=False)
    results = tunesmith.train(tiny_config)
    said = capsys.readouterr().err  # the person watching sees each evaluation as it comes
    assert "step 3: eval loss 2.0000 (the best yet)" in said and "step 4: eval loss 2.1000 (best 2.0000 at step 3)" in said
    assert "early stop at step 5" in said
    run = Path(results["run_dir"])
    # Best at step 3; steps 4 and 5 bring no improvement: patience 2 stops at step 5.
    assert results["steps"] == 5 and results["early_stopped_at"] == 5
    assert results["best_step"] == 3 and results["restored_best"]
    assert len(seen) == 5
    assert results["fine_tuned"]["eval_loss"] == 2.0
    assert same_weights(lora_weights(run), seen[2])
    assert not same_weights(lora_weights(run), seen[4])
    events = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert {"event": "early_stop", "step": 5, "best_step": 3} .items() <= next(e for e in events if e["event"] == "early_stop").items()
    assert any(e["event"] == "restore_best" and e["best_step"] == 3 for e in events)
    # log_every 4: the step it stopped at has its record too (results.json's final_loss is that step's)
    assert [e["step"] for e in events if e["event"] == "train"] == [4, 5]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["perplexity"] for e in evals[:2]] == pytest.approx([math.exp(3.0), math.exp(2.5)])  # sft: a token loss
    assert (run / "report.html").exists() and (run / "report.json").exists()


def test_best_weights_restored_at_the_end_without_early_stopping(tiny_config, monkeypatch):
    # Evaluations at steps 1 and 2, then fit measures the last step (3): worse, so step 2 comes back.
    seen = scripted_eval(monkeypatch, [2.0, 1.5, 1.8])
    tiny_config["train"]["max_steps"] = 3
    tiny_config["eval"].update(every_steps=1, generate=False)
    results = tunesmith.train(tiny_config)
    assert results["steps"] == 3 and results["early_stopped_at"] is None
    assert results["best_step"] == 2 and results["restored_best"]
    assert same_weights(lora_weights(results["run_dir"]), seen[1])


def test_last_weights_kept_when_they_are_best(tiny_config, monkeypatch):
    seen = scripted_eval(monkeypatch, [2.0, 1.5, 1.4])
    tiny_config["train"]["max_steps"] = 3
    tiny_config["eval"].update(every_steps=1, generate=False, report=False)
    results = tunesmith.train(tiny_config)
    assert results["restored_best"] is False and results["fine_tuned"]["eval_loss"] == 1.4
    assert results["best_step"] == 3  # the last evaluation's (was 2: the best of those before it)
    assert same_weights(lora_weights(results["run_dir"]), seen[2])


def scripted_metric(monkeypatch, values):
    """The validation answers' scores of each evaluation by eval.best_metric, scripted (the base's
    first); remember the weights at each call after the base's."""
    from tunesmith.eval import selection

    seen = []

    def fake_score(answers, references, scorer=None):
        assert len(answers) == len(references) == 4  # eval.best_metric_examples
        seen.append({k: v.clone() for k, v in trainable_state(model_of[0]).items()} if model_of else {})
        return {"rouge_l": values[len(seen) - 1], "token_f1": 0.5, "test_examples": 4}

    model_of = []
    real_init = selection.Selection.__init__

    def init(self, model, *rest):
        model_of.append(model)
        real_init(self, model, *rest)

    monkeypatch.setattr(selection.Selection, "__init__", init)
    monkeypatch.setattr(selection, "score", fake_score)
    return seen


def test_best_weights_and_early_stopping_can_follow_a_generation_metric(tiny_config, monkeypatch, capsys):
    """eval.best_metric=rouge_l: the eval loss falls at every evaluation, ROUGE-L peaks at step 2
    (higher is better) and does not beat it for two evaluations, so patience 2 stops at step 4 and
    step 2's weights come back; the eval loss alone would never have stopped."""
    scripted_eval(monkeypatch, [3.0, 2.9, 2.8, 2.7, 2.6, 2.5])
    seen = scripted_metric(monkeypatch, [0.10, 0.20, 0.40, 0.35, 0.39, 0.30])  # base, steps 1-4, the kept weights
    tiny_config["train"]["max_steps"] = 8
    tiny_config["eval"].update(every_steps=1, patience=2, generate=False, best_metric="rouge_l",
                               best_metric_examples=4)
    results = tunesmith.train(tiny_config)
    assert results["steps"] == 4 and results["early_stopped_at"] == 4 and results["best_metric"] == "rouge_l"
    assert results["best_step"] == 2 and results["restored_best"]
    assert same_weights(lora_weights(results["run_dir"]), seen[2])  # the weights scored 0.40
    assert results["base"]["validation_rouge_l"] == 0.10 and results["fine_tuned"]["eval_loss"] == 2.9
    # the kept weights' figure is the one scored at step 2, not generated a sixth time
    assert results["fine_tuned"]["validation_rouge_l"] == 0.40 and len(seen) == 5
    evals = [json.loads(line) for line in open(Path(results["run_dir"]) / "metrics.jsonl")]
    assert [e["validation_rouge_l"] for e in evals if e["event"] == "eval"][:4] == [0.20, 0.40, 0.35, 0.39]
    [stopped] = [e for e in evals if e["event"] == "early_stop"]
    assert (stopped["metric"], stopped["best"], stopped["best_step"]) == ("rouge_l", 0.40, 2)  # the figure, not its key
    said = capsys.readouterr().err
    assert "step 2: eval loss 2.9000, rouge_l 0.4000 (the best yet)" in said
    assert "step 3: eval loss 2.8000, rouge_l 0.3500 (best 0.4000 at step 2)" in said
    assert "early stop at step 4: no rouge_l improvement" in said and "restored the weights of step 2 (rouge_l 0.4000" in said


def test_a_best_metric_the_answers_do_not_have_is_refused_before_training(tiny_config):
    from tunesmith.errors import UserError

    tiny_config["eval"].update(every_steps=4, generate=False, best_metric="rouge_1", best_metric_examples=2)
    with pytest.raises(UserError, match=r"eval.best_metric=rouge_1: .*all_fields"):
        tunesmith.train(tiny_config)
    events = [json.loads(line) for line in open(Path(tiny_config["output"]["dir"]) / "metrics.jsonl")]
    assert not any(e.get("event") == "train" for e in events)  # no step was trained


def test_scoring_answers_during_training_leaves_the_training_as_it_was(tiny_config, tmp_path):
    """Generating validation answers at every evaluation (eval.best_metric=all_fields on the demo's
    JSON) changes no step of the training: the adapter is not merged for it and the RNG is kept."""
    import copy

    runs = {}
    for metric in ("eval_loss", "all_fields"):
        config = copy.deepcopy(tiny_config)
        config["train"].update(max_steps=8, log_every=1)
        config["eval"].update(every_steps=4, generate=False, best_metric=metric, best_metric_examples=2,
                              max_new_tokens=8, temperature=0.7, restore_best=False)
        config["output"]["dir"] = str(tmp_path / metric)
        runs[metric] = [json.loads(line) for line in open(Path(tunesmith.train(config)["run_dir"]) / "metrics.jsonl")]
    losses = {m: [r["loss"] for r in records if r["event"] == "train"] for m, records in runs.items()}
    assert len(losses["eval_loss"]) == 8 and losses["eval_loss"] == losses["all_fields"]
    scored = [r["validation_all_fields"] for r in runs["all_fields"] if r["event"] == "eval"]
    assert len(scored) == 2 and all(0.0 <= s <= 1.0 for s in scored)


def test_scoring_validation_answers_leaves_the_random_state_as_it_was(tiny_model_dir, tiny_tokenizer):
    """eval.best_metric's answers, sampled at temperature 0.7, seed and draw from torch's RNG: Selection puts
    it back, so the dropout masks of the steps after an evaluation are those of a run without it (with the
    default dropout 0 no step reads the RNG, so training's own losses cannot show this)."""
    from types import SimpleNamespace

    from tunesmith.config import EvalConfig
    from tunesmith.data.demo import make_splits
    from tunesmith.eval.selection import Selection
    from tunesmith.models import load_model

    model = load_model(str(tiny_model_dir)).train()
    validation = SimpleNamespace(conversations=[r["messages"] for r in make_splits(2, seed=1, validation_size=0,
                                                                                   test_size=0)["train"]])
    cfg = EvalConfig(best_metric="all_fields", best_metric_examples=1, max_new_tokens=4, temperature=0.7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    assert 0.0 <= Selection(model, tiny_tokenizer, validation, cfg)("validation") <= 1.0
    assert torch.equal(torch.get_rng_state(), before) and model.training
