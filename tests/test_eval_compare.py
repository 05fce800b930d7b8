"""Compare: paired bootstrap intervals, wins/ties/losses, k-shot prompts, per-example answer loss."""
import io
import json
import math

import numpy as np
import pytest
import torch

from tunesmith.data.collate import collate
from tunesmith.data.tokenize import encode
from tunesmith.eval.baselines import compare_models
from tunesmith.eval.compare import (Scored, answer_losses, compare_scored, format_table,
                                    paired_bootstrap, pick_shots, win_tie_loss, with_shots, write_comparison)
from tunesmith.models import load_model, load_tokenizer
from tunesmith.training.loss import label_loss_sum

from helpers import write_jsonl


def test_bootstrap_interval_covers_the_true_difference():
    """On synthetic paired scores with a known mean difference, the 95% interval covers it in
    about 95% of repeated experiments, and excludes zero when the effect is clear."""
    true_difference, covered = 0.1, 0
    trials = 200
    for trial in range(trials):
        rng = np.random.default_rng(1000 + trial)
        difficulty = rng.uniform(0, 1, 150)  # shared per example: what pairing removes
        a = difficulty + rng.normal(0, 0.3, 150)
        b = difficulty + true_difference + rng.normal(0, 0.3, 150)
        interval = paired_bootstrap(a, b, samples=1000, seed=trial)
        assert interval["low"] <= interval["difference"] <= interval["high"]
        covered += interval["low"] <= true_difference <= interval["high"]
    assert 0.90 <= covered / trials <= 0.99
    assert interval["low"] > 0  # 150 pairs are enough to see an effect of 0.1 at this noise


def test_the_interval_is_the_bootstraps_central_95_percent():
    """The coverage above cannot tell 95% from 90% in 200 trials: the bounds are the 2.5% and 97.5%
    quantiles of the resampled paired differences, recomputed here from the same draws."""
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0, 1, 40), rng.uniform(0, 1, 40)
    picks = np.random.default_rng(7).integers(0, 40, size=(500, 40))
    differences = b[picks].mean(1) - a[picks].mean(1)
    interval = paired_bootstrap(a, b, samples=500, seed=7)
    assert [interval["low"], interval["high"]] == pytest.approx(list(np.quantile(differences, [0.025, 0.975])))
    narrower = paired_bootstrap(a, b, samples=500, seed=7, confidence=0.9)
    assert interval["low"] < narrower["low"] < narrower["high"] < interval["high"]


def test_bootstrap_weighted_mean_and_tiny_samples():
    a, b = np.array([1.0, 3.0]), np.array([1.0, 1.0])
    result = paired_bootstrap(a, b, weights_a=np.array([1.0, 3.0]), weights_b=np.array([1.0, 3.0]), samples=500)
    assert result["difference"] == pytest.approx(1.0 - 10 / 4)
    same = paired_bootstrap(a, a.copy(), samples=200)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError):
        paired_bootstrap(np.array([]), np.array([]))


def _right_or_wrong(both: int, b_only: int, a_only: int, neither: int) -> tuple[Scored, Scored]:
    """A's and B's exact-match rows over the four kinds of example of a paired 2x2 table."""
    a = [1.0] * both + [0.0] * b_only + [1.0] * a_only + [0.0] * neither
    b = [1.0] * both + [1.0] * b_only + [0.0] * a_only + [0.0] * neither
    return (Scored("a", [""] * len(a), [{"exact_match": x} for x in a]),
            Scored("b", [""] * len(b), [{"exact_match": x} for x in b]))


def test_right_or_wrong_scores_get_newcombes_paired_interval():
    """Exact match, every field right, a probe item: each example is right or wrong, and the percentile
    bootstrap of such pairs is too narrow where few examples change ([0, 0] where none does). Their
    interval is Newcombe's (1998, method 10) for paired proportions, here against the published figures
    of R's contingencytables (Cavo et al. 2012: 59 both, 6 B only, 16 A only, 80 neither)."""
    a, b = _right_or_wrong(59, 6, 16, 80)
    row = compare_scored(a, b, samples=300)[0]
    assert row["difference"] == pytest.approx(-10 / 161)
    assert (round(row["low"], 4), round(row["high"], 4)) == (-0.1186, -0.0046)
    a, b = _right_or_wrong(5, 0, 0, 25)  # no example changed: not "[+0.000, +0.000]"
    row = compare_scored(a, b, samples=300)[0]
    assert row["difference"] == 0 and row["low"] < -0.05 and row["high"] > 0.05
    # one model's share right (choose, curve): Wilson's interval (Newcombe 1998's table: 81/263 -> 0.2553 to 0.3662)
    found = _right_or_wrong(81, 0, 0, 182)[0].interval("exact_match")
    assert (round(found["low"], 4), round(found["mean"], 4), round(found["high"], 4)) == (0.2553, 0.308, 0.3662)


def test_right_or_wrong_intervals_cover_the_true_difference():
    """1,000 simulated comparisons of 30 right/wrong pairs, A right on 40%, B gaining 5% of examples and
    losing 2% (true difference +3 points): a 95% interval must cover +0.03 at least 93% of the time. The
    percentile bootstrap covered 75% (on a fifth of the data sets no example changed: [0, 0])."""
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(1000):
        a = (rng.random(30) < 0.4).astype(float)
        u = rng.random(30)
        b = a.copy()
        b[(a == 0) & (u < 0.05 / 0.6)] = 1.0
        b[(a == 1) & (u < 0.02 / 0.4)] = 0.0
        row = compare_scored(Scored("a", [""] * 30, [{"exact_match": x} for x in a]),
                             Scored("b", [""] * 30, [{"exact_match": x} for x in b]), samples=200, seed=trial)[0]
        covered += row["low"] <= 0.03 <= row["high"]
    assert covered / 1000 >= 0.93


def test_win_tie_loss_direction():
    """B against A per example: higher B wins a score, lower B wins a loss. Two rises, one fall and a
    tie, so the counts differ by direction (a symmetric set could not tell the direction apart)."""
    a, b = np.array([0.5, 0.5, 0.5, 0.2]), np.array([0.7, 0.5, 0.1, 0.9])
    assert win_tie_loss(a, b, lower_is_better=False) == {"win": 2, "tie": 1, "loss": 1}
    assert win_tie_loss(a, b, lower_is_better=True) == {"win": 1, "tie": 1, "loss": 2}
    assert win_tie_loss(np.array([1.0]), np.array([0.5]), lower_is_better=True)["win"] == 1


def test_compare_scored_rows_and_table():
    base = Scored("base", ["x"] * 3, [{"rouge_l": 0.1, "answer_loss": 2.0}, {"rouge_l": 0.2, "answer_loss": 3.0},
                                      {"rouge_l": 0.3, "answer_loss": 2.5}], [10, 20, 10])
    tuned = Scored("tuned", ["y"] * 3, [{"rouge_l": 0.4, "answer_loss": 1.0}, {"rouge_l": 0.2, "answer_loss": 2.0},
                                        {"rouge_l": 0.5, "answer_loss": 3.0}], [10, 20, 10])
    rows = {r["metric"]: r for r in compare_scored(base, tuned, samples=300)}
    assert rows["rouge_l"]["difference"] == pytest.approx(0.5 / 3)
    assert (rows["rouge_l"]["win"], rows["rouge_l"]["tie"], rows["rouge_l"]["loss"]) == (2, 1, 0)
    # answer loss is per token: (10*2 + 20*3 + 10*2.5) / 40 = 2.625 -> (10 + 40 + 30) / 40 = 2.0
    assert rows["answer_loss"]["baseline_value"] == pytest.approx(2.625)
    assert rows["answer_loss"]["difference"] == pytest.approx(-0.625)
    assert (rows["answer_loss"]["win"], rows["answer_loss"]["loss"]) == (2, 1)
    table = format_table({"models": {"base": base.means(), "tuned": tuned.means()}, "differences": list(rows.values())})
    assert "tuned - base  rouge_l" in table and "win/tie/loss 2/1/0" in table



def test_metrics_some_examples_lack_are_compared_where_both_have_them():
    """A JSON field only some references hold, tool-call scores beside text scores, a scorer's key given
    for some answers: each metric over the examples that have it, not a KeyError after training."""
    base = Scored("base", ["x"] * 3, [{"all_fields": 0.0, "field/a": 0.0, "field/b": 0.0}, {"all_fields": 0.0, "field/a": 1.0},
                                      {"all_fields": 1.0, "field/a": 1.0, "field/b": 1.0}])
    tuned = Scored("tuned", ["y"] * 3, [{"all_fields": 1.0, "field/a": 1.0, "field/b": 1.0}, {"all_fields": 1.0, "field/a": 1.0},
                                        {"all_fields": 1.0, "field/a": 1.0}])
    rows = {r["metric"]: r for r in compare_scored(base, tuned, samples=200)}
    assert rows["field/b"]["examples"] == 1 and rows["field/b"]["difference"] == 1.0
    assert rows["field/a"]["examples"] == 3 and rows["field/a"]["difference"] == pytest.approx(1 / 3)
    assert (rows["all_fields"]["win"], rows["all_fields"]["tie"]) == (2, 1)
    assert base.interval("field/b", samples=200)["mean"] == 0.5  # of the two examples that have it


def test_the_answer_loss_interval_is_around_the_per_token_mean():
    """choose and curve show the answer loss per token; its interval is of that mean, not the mean of examples."""
    scored = Scored("m", [""] * 4, [{"answer_loss": v} for v in (0.5, 0.6, 4.0, 3.0)], [100, 100, 1, 1])
    found = scored.interval("answer_loss", samples=500)
    assert found["mean"] == pytest.approx(scored.means()["answer_loss"]) == pytest.approx(117 / 202)
    assert found["low"] <= found["mean"] <= found["high"]

def test_closing_table_lists_the_tuned_figures_without_a_scored_base():
    from tunesmith.api import comparison_table

    tuned = {"eval_loss": 0.15, "all_fields": 0.105, "json_valid": 1.0, "test_examples": 200,
             "generated_tokens_per_second": 30.9}  # the machine's speed (load, warm-up), not the model's: left out
    lines = comparison_table({"eval_loss": 1.2, "generated_tokens_per_second": 16.7}, tuned).splitlines()
    assert [line.split() for line in lines[1:]] == [
        ["eval_loss", "1.200", "0.150"], ["all_fields", "-", "0.105"], ["json_valid", "-", "1.000"]]
    both = comparison_table({"eval_loss": 1.2, "all_fields": 0.0, "json_valid": 0.5}, tuned).splitlines()
    assert both[2].split() == ["all_fields", "0.000", "0.105"]
    grpo = comparison_table({"eval_loss": -0.0001}, {"eval_loss": -0.0004}).splitlines()  # minus a mean reward
    assert grpo[1].split() == ["eval_loss", "0.000", "0.000"]  # not "-0.000"


def test_with_shots_keeps_system_first():
    shot = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert [m["content"] for m in with_shots(conversation, [shot, shot])] == ["S", "q1", "a1", "q1", "a1", "q", "a"]
    assert [m["content"] for m in with_shots(conversation[1:], [shot])] == ["q1", "a1", "q", "a"]


def test_answer_loss_counts_only_the_last_answer(tiny_model_dir, tiny_tokenizer):
    model = load_model(str(tiny_model_dir))
    question = [{"role": "user", "content": "My PixelPad froze"}, {"role": "assistant", "content": '{"a": 1}'}]
    shot = [{"role": "user", "content": "Invoice wrong"}, {"role": "assistant", "content": '{"b": 2}'}]
    (alone,), (count_alone,) = answer_losses(model, tiny_tokenizer, [question])
    total, count = label_loss_sum(model, collate([encode(tiny_tokenizer, question)], tiny_tokenizer.pad_token_id))
    assert count_alone == count and alone == pytest.approx(total.item() / count, rel=1e-5)
    (_,), (count_shot,) = answer_losses(model, tiny_tokenizer, [with_shots(question, [shot])])
    assert count_shot == count_alone  # the k-shot example's answer carries no label


@pytest.mark.parametrize("fast", [True, False])
def test_answer_losses_in_batches_equal_one_at_a_time(tiny_model_dir, tiny_tokenizer, fast):
    """Batched (padding-free with the fast paths, padded without) the per-example answer losses
    and counts are those of each example scored alone, whatever the batch's lengths and order."""
    from helpers import lora_model

    from tunesmith.data.collate import PADDED, PADDING_FREE

    model = lora_model(load_model(str(tiny_model_dir)), seed=2, fast_paths=fast)
    layout = PADDING_FREE if fast else PADDED
    shot = [{"role": "user", "content": "Invoice wrong"}, {"role": "assistant", "content": '{"b": 2}'}]
    conversations = [[{"role": "user", "content": "ticket " + "word " * (3 * i)},
                      {"role": "assistant", "content": '{"a": %d}' % i + " x" * (i % 4)}] for i in range(7)]
    conversations[2] = with_shots(conversations[2], [shot])
    alone = [answer_losses(model, tiny_tokenizer, [c], layout) for c in conversations]
    losses, counts = answer_losses(model, tiny_tokenizer, conversations, layout, batch_size=3)
    assert counts == [count for _, (count,) in alone]
    assert losses == pytest.approx([loss for (loss,), _ in alone], rel=1e-4)
    assert len(set(counts)) > 1


@pytest.mark.parametrize("fast", [True, False])
def test_one_pass_scoring_equals_scoring_and_generating_apart(tiny_model_dir, tiny_tokenizer, fast):
    """answer_and_score (the reference's loss and the answer from one pass over each prompt) gives
    the losses of answer_losses and the greedy answers of generate_answers, LoRA merged or not."""
    from helpers import lora_model

    from tunesmith.data.collate import PADDED, PADDING_FREE
    from tunesmith.eval.generate import answer_and_score, generate_answers

    model = lora_model(load_model(str(tiny_model_dir)), seed=4, fast_paths=fast)
    shot = [{"role": "user", "content": "Invoice wrong"}, {"role": "assistant", "content": '{"b": 2}'}]
    conversations = [[{"role": "user", "content": "ticket " + "word " * (5 * i)},
                      {"role": "assistant", "content": '{"a": %d}' % i + " x" * (3 * i % 7)}] for i in range(6)]
    conversations[1] = with_shots(conversations[1], [shot, shot])
    answers, losses, counts, speed = answer_and_score(model, tiny_tokenizer, conversations, 12, batch_size=4)
    expected_losses, expected_counts = answer_losses(model, tiny_tokenizer, conversations, PADDING_FREE if fast else PADDED)
    expected_answers, _ = generate_answers(model, tiny_tokenizer, conversations, 12, batch_size=4)
    assert counts == expected_counts and losses == pytest.approx(expected_losses, rel=1e-4)
    assert answers == expected_answers and speed["generated_tokens"] > 0
    assert not any(getattr(m, "merged", False) for m in model.modules())  # the adapter is unmerged again


def test_long_rows_do_not_pad_a_batch_of_short_ones():
    """A long test example (a 2,600-token reference) gets its own batch instead of padding eleven
    short ones to its length; rows of 1,500 tokens go ten to a batch of 16 x 1,024 tokens; every
    index once, each batch of similar length."""
    from tunesmith.eval.generate import ROW_TOKENS, length_batches

    lengths = [2600] + [300 + i for i in range(11)]
    assert length_batches(lengths, 16) == [list(range(1, 12)), [0]]
    batches = length_batches([1500] * 20, 16)
    assert [len(b) for b in batches] == [10, 10] and 10 * 1500 <= 16 * ROW_TOKENS < 11 * 1500
    mixed = [(i * 37) % 400 + 1 for i in range(50)]
    batches = length_batches(mixed, 8)
    assert sorted(i for b in batches for i in b) == list(range(50)) and max(len(b) for b in batches) == 8
    assert all(mixed[a] <= mixed[b] for first, second in zip(batches, batches[1:]) for a in first for b in second)
    assert length_batches([5000, 10], 4) == [[1], [0]]  # a row over the budget (4 x 1,024) alone


def test_eval_scores_every_example_of_a_file(tiny_model_dir, tmp_path, monkeypatch):
    """`tunesmith eval --data`: generation scores on every example, a reference longer than
    max_seq_len too (as `compare` and a run's test split score them); eval loss as training sees it."""
    from tunesmith.measure import evaluate

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    rows = [{"question": f"Ticket {i}: screen broken", "answer": f"technical {i}"} for i in range(5)]
    rows.append({"question": "Describe everything", "answer": " ".join(f"word{i}" for i in range(700))})
    result = evaluate(str(tiny_model_dir), str(write_jsonl(tmp_path / "d.jsonl", rows)), max_new_tokens=4)
    assert result["test_examples"] == 6 and math.isfinite(result["eval_loss"])
    # No example within max_seq_len: no eval loss, rather than a perfect 0.0
    result = evaluate(str(tiny_model_dir), str(write_jsonl(tmp_path / "long.jsonl", rows[-1:])), max_new_tokens=4)
    assert "eval_loss" not in result and result["test_examples"] == 1


def test_eval_scores_tool_calls_as_a_run_and_compare_do(monkeypatch):
    """`tunesmith eval` and eval.best_metric score an answer that should call a tool by its calls."""
    import tunesmith.eval.scoring as scoring
    from tunesmith.config import EvalConfig

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    conversations = [[{"role": "tools", "tools": tools}, {"role": "user", "content": "Weather in Paris?"},
                      {"role": "assistant", "content": "", "tool_calls": [call]}],
                     [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]]
    answers = ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', "hi"]
    monkeypatch.setattr(scoring, "generate_answers", lambda *a, **k: (answers, {"tokens_per_second": 1.0}))
    scores = scoring.score_generation(None, None, conversations, EvalConfig())
    assert scores["tool_call_valid"] == scores["tool_arguments_exact"] == 1.0 and scores["exact_match"] == 1.0
    assert scoring.score(answers, conversations) == {k: v for k, v in scores.items()
                                                     if k not in ("test_examples", "generated_tokens_per_second")}


def test_eval_names_a_missing_data_file_as_the_option_given_before_loading_the_model(monkeypatch):
    import tunesmith.runs
    from tunesmith.measure import evaluate
    from tunesmith.errors import UserError

    monkeypatch.setattr(tunesmith.runs, "load_trained", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(UserError, match=r"^/nope.jsonl: data file not found \(--data\)$"):
        evaluate("default", "/nope.jsonl")


def test_a_tenth_of_answers_longer_than_generation_gets_a_warning():
    from tunesmith.config import EvalConfig
    from tunesmith.eval.baselines import cut_answers_warning

    cfg = EvalConfig(max_new_tokens=96)
    assert cut_answers_warning([96] * 10, cfg) is None  # as long as may be generated: whole
    warning = cut_answers_warning([96] * 9 + [300], cfg)
    assert warning.startswith("warning: 1 of 10 test answers are longer than eval.max_new_tokens=96 (the median "
                              "of those 300 tokens)")
    assert cut_answers_warning([96] * 19 + [300], cfg) is None  # one in twenty
    # Only the examples scored count (eval.test_limit).
    assert cut_answers_warning([10, 10, 500, 500], EvalConfig(max_new_tokens=96, test_limit=2)) is None
    assert cut_answers_warning([], cfg) is None


def test_one_pass_scoring_steps_aside_for_sliding_window_caches(tiny_tokenizer):
    """A sliding-window cache cannot be cut back to the prompt: such models score and generate apart."""
    from transformers import MistralConfig, MistralForCausalLM

    from tunesmith.eval.generate import answer_and_score

    config = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert answer_and_score(MistralForCausalLM(config), tiny_tokenizer, [conversation], 4) is None


def test_pick_shots_is_seeded_and_leaves_out_test_prompts(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    exclude = [[{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "x"}] for i in range(10)]
    shots = pick_shots(str(path), 3, seed=4, exclude=exclude)
    assert shots == pick_shots(str(path), 3, seed=4, exclude=exclude)
    assert all(int(s[0]["content"][1:]) >= 10 for s in shots)


def test_compare_end_to_end_on_tiny_models(tiny_model_dir, tmp_path):
    from helpers import build_model

    other = tmp_path / "other"
    build_model(other, vocab=len(load_tokenizer(str(tiny_model_dir))), seed=5)  # same shape, other weights
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((tiny_model_dir / name).read_bytes())
    rows = [{"question": f"Ticket {i}: screen is broken", "answer": f"technical {i}"} for i in range(6)]
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}, {"question": "r", "answer": "b"},
                                                   {"question": "Ticket: my screen broke", "answer": "technical"}])
    result = compare_models(str(tiny_model_dir), str(other), str(data), kshot=1, kshot_data=str(train),
                            max_new_tokens=6, batch_size=4, samples=200, names=("base", "other"), retrieval_k=1)
    rows = ["base", "base 1-shot", "base + retrieval", "other + retrieval", "other"]
    assert list(result["models"]) == rows
    assert {"answer_loss", "rouge_l", "token_f1", "exact_match"} <= set(result["models"]["other"])
    pairs = {(d["baseline"], d["metric"]) for d in result["differences"]}
    assert ("base", "answer_loss") in pairs and ("base 1-shot", "rouge_l") in pairs
    assert ("other + retrieval", "rouge_l") in pairs and all(d["candidate"] == "other" for d in result["differences"])
    assert all(d["win"] + d["tie"] + d["loss"] == 6 for d in result["differences"])
    assert result["primary_metric"] == "rouge_l" and "rouge_l" in result["verdict"]
    assert "verdict: " in format_table(result)
    write_comparison(result, tmp_path / "out")
    lines = [json.loads(line) for line in open(tmp_path / "out" / "comparison.jsonl")]
    assert len(lines) == 6 and set(rows) <= set(lines[0])
    assert "examples" not in json.loads((tmp_path / "out" / "comparison.json").read_text())


def test_eval_and_compare_say_which_lines_they_left_out(tiny_model_dir, tmp_path, capsys):
    """A broken line, or a record without an answer, was skipped without a word: the scores (and the
    verdict) were of fewer examples than the file holds, and nothing said so."""
    from tunesmith.measure import evaluate

    data = tmp_path / "test.jsonl"
    data.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?" "answer": "d"}\n'
                    '{"question": "e?", "answer": ""}\n{"question": "f?", "answer": "g"}\n')
    compare_models(str(tiny_model_dir), str(tiny_model_dir), str(data), max_new_tokens=2, batch_size=4, samples=50)
    said = capsys.readouterr().err
    assert "skipped 2 records that cannot be scored:" in said, said
    assert f"e.g. {data}:2: broken JSON" in said and f"{data}:3" in said
    evaluate(str(tiny_model_dir), str(data), max_new_tokens=2, batch_size=4)
    said = capsys.readouterr().err
    assert "skipped 2 records that cannot be scored:" in said and f"{data}:2: broken JSON" in said, said
    # --limit 1: only line 1 is scored, lines 2 and 3 never reached, so not said; --limit 2 reaches line 4
    for limit, skipped in ((1, None), (2, "skipped 2 records")):
        compare_models(str(tiny_model_dir), str(tiny_model_dir), str(data), max_new_tokens=2, batch_size=4, samples=50,
                       limit=limit)
        evaluate(str(tiny_model_dir), str(data), max_new_tokens=2, batch_size=4, limit=limit)
        said = capsys.readouterr().err
        assert (said.count(skipped) == 2) if skipped else "skipped" not in said, said


def test_compare_command_writes_into_the_run_and_refreshes_its_report(tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli import main
    from test_report import fake_run

    run = fake_run(tmp_path / "run")  # a run folder whose "trained model" is the tiny model itself
    (run / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    data = write_jsonl(tmp_path / "test.jsonl", [{"question": "Screen broken?", "answer": "technical"}] * 3)
    assert main(["compare", str(tiny_model_dir), str(run), "--data", str(data), "--max-new-tokens", "4"]) == 0
    table = capsys.readouterr().err
    assert f"run - {tiny_model_dir.name}  rouge_l" in table and "win/tie/loss 0/3/0" in table
    summary = json.loads((run / "comparison.json").read_text())
    same = {d["metric"]: d for d in summary["differences"]}
    # The same weights on both sides: no difference, every example a tie.
    assert same["answer_loss"]["difference"] == pytest.approx(0.0, abs=1e-6) and same["rouge_l"]["tie"] == 3
    assert "rouge_l" in (run / "report.html").read_text()
    assert main(["compare", "a", "b", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: data file not found" in capsys.readouterr().err



@pytest.fixture
def looping_model(tiny_model_dir, tiny_tokenizer):
    """The tiny model with its logits replaced by a fixed ranking of 30 words: decoded greedily it
    says the first word forever (a loop); a repetition penalty walks down the ranking instead."""
    import torch

    words = [i for i in range(len(tiny_tokenizer))
             if tiny_tokenizer.decode([i]).startswith(" ") and tiny_tokenizer.decode([i]).strip().isalpha()][:30]
    ranking = torch.zeros(len(tiny_tokenizer))
    ranking[words] = torch.arange(30, 0, -1, dtype=torch.float)
    model = load_model(str(tiny_model_dir))
    model.lm_head.register_forward_hook(lambda module, inputs, out: torch.zeros_like(out) + ranking)
    return model, tiny_tokenizer


def test_the_loop_guard_stops_a_loop(looping_model):
    from tunesmith.eval.decoding import LoopGuard
    from tunesmith.eval.generate import generate_answers
    from tunesmith.eval.metrics import repetition

    model, tokenizer = looping_model
    conversations = [[{"role": "user", "content": f"Ticket {i}: screen broken"}, {"role": "assistant", "content": "x"}]
                     for i in range(3)]
    greedy, _ = generate_answers(model, tokenizer, conversations, 24, batch_size=3)
    penalised, _ = generate_answers(model, tokenizer, conversations, 24, batch_size=3, guard=LoopGuard(100.0))
    assert all(repetition(a) > 0.9 for a in greedy) and all(repetition(a) == 0.0 for a in penalised)
    assert len(set(penalised[0].split())) == 24  # 24 different words, in the order of the ranking
    # No 2-gram twice: after 'w1 w1' the next w1 would repeat it, so the second-ranked word comes in
    ngrams, _ = generate_answers(model, tokenizer, conversations, 24, batch_size=3, guard=LoopGuard(1.0, 2))
    words = ngrams[0].split()
    pairs = list(zip(words, words[1:]))
    assert len(pairs) == len(set(pairs)) == 23 and repetition(ngrams[0]) < repetition(greedy[0])
    assert str(LoopGuard(1.2, 4)) == "repetition penalty 1.2, no repeated 4-grams" and str(LoopGuard()) == "off"


def test_the_models_own_generation_settings_stay_out_of_evaluation_and_rollouts(looping_model):
    """generate() fills each option a call leaves unset from the model's generation_config (Qwen2.5
    ships repetition_penalty 1.05, top_p 0.8, top_k 20): greedy answers walked down the ranking
    instead of repeating its first word, and GRPO's samples came from a filtered distribution, not
    the one its loss scores. Both are the model's own now; `chat` alone keeps the shipped settings."""
    from tunesmith.eval.generate import generate_answers
    from tunesmith.eval.metrics import repetition
    from tunesmith.objectives.rollout import sample

    model, tokenizer = looping_model
    model.generation_config.update(repetition_penalty=100.0, top_k=2, top_p=0.5, do_sample=True, temperature=0.7)
    conversations = [[{"role": "user", "content": f"Ticket {i}: screen broken"}, {"role": "assistant", "content": "x"}]
                     for i in range(3)]
    greedy, _ = generate_answers(model, tokenizer, conversations, 24, batch_size=3)
    assert all(repetition(a) > 0.9 for a in greedy)  # the argmax at each step: the first word again
    prompt = tokenizer("screen broken")["input_ids"]
    assert sample(model, [prompt], 2, 6, None, tokenizer.pad_token_id, [])[0] == sample(
        model, [prompt], 1, 6, None, tokenizer.pad_token_id, [])[0]  # greedy rollouts: the argmax too
    assert len(set(sample(model, [prompt], 2, 6, None, tokenizer.pad_token_id, [])[0])) == 1
    first = [answer[0] for answer in sample(model, [prompt], 64, 1, 20.0, tokenizer.pad_token_id, [], seed=3)]
    assert len(set(first)) > 10  # at temperature 20, far more than the shipped top_k of 2 would let through


def test_the_loop_guard_looks_at_the_answer_alone(looping_model):
    """The prompt (a question's own words, k-shot examples) neither bans n-grams from the answer nor is
    penalised in it: this model answers the same whatever its prompt, so every prompt gets the same answer."""
    from tunesmith.eval.decoding import LoopGuard
    from tunesmith.eval.generate import generate_answers

    model, tokenizer = looping_model
    first = generate_answers(model, tokenizer, [[{"role": "user", "content": "screen broken"}]], 8)[0][0].split()[0]
    neutral = [{"role": "user", "content": "Ticket: screen broken"}, {"role": "assistant", "content": "x"}]
    echo = [{"role": "user", "content": f"Ticket:{' ' + first * 3}"}, {"role": "assistant", "content": "x"}]
    for guard in (LoopGuard(100.0), LoopGuard(1.0, 2)):
        answers, _ = generate_answers(model, tokenizer, [neutral, echo], 12, batch_size=2, guard=guard)
        assert answers[0] == answers[1] and answers[0].split()[0] == first, guard


def test_an_answer_ends_at_the_end_of_turn_that_training_labels(tmp_path):
    """Phi-3 ends an assistant turn with <|end|>, its EOS is <|endoftext|>: generation, chat and sampling
    stop at either, so what the model says after its turn is not scored as part of the answer."""
    from families import build_family_model, build_family_tokenizer
    from transformers import LogitsProcessor, LogitsProcessorList

    from tunesmith.data.tokenize import IGNORE, encode, prompt_ids, stop_ids
    from tunesmith.eval.chat import stream_reply
    from tunesmith.eval.generate import generate_answers
    from tunesmith.objectives.rollout import sample

    tokenizer = build_family_tokenizer("phi3", tmp_path)
    model = build_family_model("phi3", tmp_path, tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end != tokenizer.eos_token_id and end in stop_ids(tokenizer, model)
    conversation = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]
    trained = encode(tokenizer, conversation)
    assert [t for t, label in zip(trained.input_ids, trained.labels) if label != IGNORE][-1] == end

    def words(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    script = words("Paris") + [end] + words("\n<|user|>\nAnd Germany?")

    class Scripted(LogitsProcessor):  # the model answers as trained, then goes on with a user turn of its own
        def __init__(self, start):
            self.start = start

        def __call__(self, ids, scores):
            step = ids.shape[1] - self.start
            forced = torch.full_like(scores, -1e9)
            forced[:, script[step] if step < len(script) else tokenizer.eos_token_id] = 0
            return forced
    real = model.generate
    model.generate = lambda **kw: real(**kw, logits_processor=LogitsProcessorList([Scripted(kw["input_ids"].shape[1])]))
    assert generate_answers(model, tokenizer, [conversation], 20, batch_size=1)[0] == ["Paris"]
    assert stream_reply(model, tokenizer, conversation[:1], 20, out=io.StringIO()) == "Paris"
    assert sample(model, [prompt_ids(tokenizer, conversation)], 1, 20, None, tokenizer.pad_token_id, stop_ids(tokenizer, model)) == \
        [words("Paris") + [end]]


def test_the_loop_guard_reaches_generation_from_eval_and_compare(looping_model, tmp_path, capsys, monkeypatch):
    import tunesmith.runs as runs
    from tunesmith.cli import main

    monkeypatch.setattr(runs, "load_trained", lambda spec, device=None: (*looping_model, None))
    data = write_jsonl(tmp_path / "test.jsonl", [{"question": f"Ticket {i}: screen broken", "answer": "technical"}
                                                 for i in range(4)])
    repeats = {}
    for flags in ([], ["--repetition-penalty", "100"], ["--no-repeat-ngram-size", "4"]):
        assert main(["eval", "looping", "--data", str(data), "--max-new-tokens", "24", *flags]) == 0
        repeats[" ".join(flags)] = json.loads(capsys.readouterr().out)["repetition"]
    assert repeats[""] > 0.9 and repeats["--repetition-penalty 100"] == 0.0
    assert repeats["--no-repeat-ngram-size 4"] < 0.5
    assert main(["compare", "a", "b", "--data", str(data), "--max-new-tokens", "24", "--repetition-penalty", "100"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["compare", "a", "b", "--data", str(data), "--max-new-tokens", "24"]) == 0
    err = capsys.readouterr().err
    assert "warning: 4 of 4 b answers loop (half or more of their word 4-grams repeat; a 4)" in err
    assert "eval.no_repeat_ngram_size: 4" in err
