"""Retrieval baseline: BM25 over the training questions picks the nearest examples; baselines table and verdict."""
import os
import subprocess
import sys

import pytest

from tunesmith.eval.baselines import (baseline_table, format_baselines, predictions_name, primary_metric, prompt_sets,
                                      verdict)
from tunesmith.eval.compare import Scored
from tunesmith.eval.retrieval import Retriever, question_of


def test_indexing_prints_no_debug_lines_where_logging_is_configured():
    """A user's (or a library's) logging.basicConfig(level=DEBUG) shows bm25s's debug records unless
    tunesmith quiets them; the retrieval still works."""
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        pool = [chat("how is glaucoma treated"), chat("what causes asthma")]
        assert Retriever(pool).nearest("glaucoma", 1) == [0]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert "bm25s" not in stream.getvalue() and "Building index" not in stream.getvalue()


def chat(question: str, answer: str = "a", system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


POOL = [chat("How is asthma treated in children?", "inhalers"),
        chat("What causes type 2 diabetes?", "insulin resistance"),
        chat("What are the symptoms of type 2 diabetes?", "thirst"),
        chat("How is a broken arm treated?", "a cast"),
        chat("What is glaucoma?", "eye pressure")]


@pytest.mark.parametrize("user_setting", [None, "cuda"])
def test_retrieval_keeps_jax_off_the_gpu_unless_the_user_chose(user_setting):
    """Importing bm25s runs JAX where it is installed, and JAX on a GPU takes 75% of its memory
    (an H200 run lost 105 GiB so): retrieval keeps JAX on the CPU, but a user's own JAX_PLATFORMS stands."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    if user_setting:
        env["JAX_PLATFORMS"] = user_setting
    script = ("import os, sys; from tunesmith.eval.retrieval import Retriever; "
              f"Retriever({POOL!r}).nearest('glaucoma', 1); "
              "assert 'bm25s' in sys.modules; print(os.environ.get('JAX_PLATFORMS'))")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == (user_setting or "cpu")


def test_nearest_training_questions_best_first():
    retriever = Retriever(POOL)
    assert retriever.nearest("symptoms of diabetes", 2) == [2, 1]
    assert retriever.nearest("treating asthma in children", 1) == [0]
    assert retriever.nearest("glaucoma", 1) == [4]
    # No known word: every score is 0 and the earliest examples come first, deterministically.
    assert retriever.nearest("zzzz qqqq", 2) == [0, 1]


def test_the_same_question_is_never_retrieved():
    retriever = Retriever(POOL)
    assert 1 not in retriever.nearest("What causes type 2 diabetes?", 4)
    assert len(retriever.nearest("What causes type 2 diabetes?", 10)) == 4
    # Nor the same question in other case, punctuation or spacing: a leaked copy as written another way
    assert 1 not in retriever.nearest("what causes  type-2 diabetes", 4)


def test_retrieved_examples_go_before_the_question_most_similar_last():
    retriever = Retriever([chat("q", "a", system="S") for _ in range(1)] + POOL)
    [prompt] = retriever.prompts([chat("What are diabetes symptoms?", "ref", system="S")], 2)
    contents = [m["content"] for m in prompt]
    assert contents[0] == "S" and contents.count("S") == 1  # the question's system message only
    assert contents[-2:] == ["What are diabetes symptoms?", "ref"]
    assert contents[-4] == "What are the symptoms of type 2 diabetes?"  # the nearest, right before the question
    assert question_of(prompt) == "What are diabetes symptoms?"


def test_prompt_sets_rows():
    test = [chat("What is glaucoma exactly?", "r")]
    sets = prompt_sets("base", test, POOL, kshot=2, retrieval_k=1, seed=0)
    assert list(sets) == ["base", "base 2-shot", "base + retrieval"]
    assert len(sets["base 2-shot"][0]) == 2 + 2 * 2 and sets["base + retrieval"][0][0]["content"] == "What is glaucoma?"
    assert list(prompt_sets("fine-tuned", test, POOL, 0, 1, 0)) == ["fine-tuned", "fine-tuned + retrieval"]


@pytest.mark.parametrize("tuned", [True, False])
def test_retrieval_on_the_fine_tuned_model_can_be_left_out(tuned, monkeypatch, tmp_path):
    from tunesmith.config import EvalConfig
    from tunesmith.eval import baselines

    asked = []
    monkeypatch.setattr(baselines, "score_rows", lambda model, tokenizer, sets, *rest: asked.append(list(sets)))
    eval_cfg = EvalConfig(retrieval_k=1, retrieval_tuned=tuned)
    baselines.score_tuned_rows(None, None, [chat("What is glaucoma exactly?", "r")], POOL, eval_cfg, tmp_path)
    assert asked == [["fine-tuned + retrieval", "fine-tuned"] if tuned else ["fine-tuned"]]


def scored(name: str, values: list[float]) -> Scored:
    return Scored(name, ["x"] * len(values), [{"rouge_l": v, "answer_loss": 1.0} for v in values], [5] * len(values))


def test_verdict_follows_the_interval():
    n = 60
    base, rag = scored("base", [0.1] * n), scored("base + retrieval", [0.3 + 0.01 * (i % 5) for i in range(n)])
    better = scored("fine-tuned", [0.5 + 0.01 * (i % 7) for i in range(n)])
    table = baseline_table([base, rag, better], samples=300)
    assert table["primary_metric"] == "rouge_l"
    assert table["verdict"].startswith("fine-tuning beats base + retrieval by +0.2")
    same = scored("fine-tuned", [0.3 + 0.01 * ((i + 2) % 5) for i in range(n)])
    assert "base + retrieval is as good" in baseline_table([base, rag, same], samples=300)["verdict"]
    worse = scored("fine-tuned", [0.2] * n)
    assert "beats fine-tuning" in baseline_table([base, rag, worse], samples=300)["verdict"]
    text = format_baselines(baseline_table([base, rag, better], samples=300))
    assert "base + retrieval" in text.splitlines()[2] and "verdict: fine-tuning beats" in text


def test_verdict_for_a_loss_and_without_prompting_rows():
    rows = [{"metric": "answer_loss", "baseline": "base", "candidate": "fine-tuned", "baseline_value": 2.0,
             "difference": -0.5, "low": -0.6, "high": -0.4}]
    assert verdict(rows, "answer_loss", "fine-tuned") == "fine-tuning beats base by +0.500 [+0.400, +0.600] lower answer_loss"
    assert primary_metric({"answer_loss": 1.0}) == "answer_loss"
    assert primary_metric({"all_fields": 0.5, "rouge_l": 0.1}) == "all_fields"
    assert predictions_name("fine-tuned") == "predictions.jsonl"
    assert predictions_name("base") == "predictions_base.jsonl"
    assert predictions_name("base 3-shot") == "predictions_base_3-shot.jsonl"
    assert predictions_name("fine-tuned + retrieval") == "predictions_fine-tuned_retrieval.jsonl"


def test_verdict_wording_when_a_baseline_wins_and_retrieval_on_the_fine_tuned_model():
    """Hand-built difference rows (fine-tuned - row). The strongest prompting row (base + retrieval)
    beats fine-tuning: its lead is said as a positive number with its interval in order, low end
    first; retrieval on top of the fine-tuned model is said to help only where its whole interval
    favours it (for a score: fine-tuned - (fine-tuned + retrieval) below 0; for a loss: above 0)."""
    def row(baseline, value, difference, low, high, metric="rouge_l"):
        return {"metric": metric, "baseline": baseline, "candidate": "fine-tuned", "baseline_value": value,
                "difference": difference, "low": low, "high": high}

    rows = [row("base", 0.2, 0.3, 0.25, 0.35), row("base + retrieval", 0.6, -0.12, -0.2, -0.05)]
    helps = row("fine-tuned + retrieval", 0.7, -0.22, -0.3, -0.1)
    assert verdict(rows + [helps], "rouge_l", "fine-tuned") == (
        "base + retrieval beats fine-tuning by +0.120 [+0.050, +0.200] rouge_l: consider it instead"
        "; retrieval on top of the fine-tuned model helps further (+0.220)")
    hurts = row("fine-tuned + retrieval", 0.4, 0.1, 0.05, 0.15)
    unsure = row("fine-tuned + retrieval", 0.45, -0.05, -0.1, 0.02)
    for own in (hurts, unsure):
        assert verdict(rows + [own], "rouge_l", "fine-tuned") == \
            "base + retrieval beats fine-tuning by +0.120 [+0.050, +0.200] rouge_l: consider it instead"
    # A loss: the lead said as how much lower (the table's difference is -0.5); flipped alike where a row wins
    assert verdict([row("base", 1.0, 0.5, 0.4, 0.6, "answer_loss")], "answer_loss", "fine-tuned") == \
        "base beats fine-tuning by +0.500 [+0.400, +0.600] lower answer_loss: consider it instead"
    # A loss: the fine-tuned model's loss minus its loss with retrieval, +0.3 [+0.2, +0.4]: retrieval lowers it
    losses = [row("base", 2.0, -0.5, -0.6, -0.4, "answer_loss"),
              row("fine-tuned + retrieval", 1.2, 0.3, 0.2, 0.4, "answer_loss")]
    assert verdict(losses, "answer_loss", "fine-tuned") == (
        "fine-tuning beats base by +0.500 [+0.400, +0.600] lower answer_loss"
        "; retrieval on top of the fine-tuned model helps further (+0.300)")


@pytest.mark.parametrize("k", [1, 3])
def test_retrieval_k_larger_than_pool(k):
    assert len(Retriever(POOL[:2]).nearest("diabetes", k)) == min(k, 2)


def test_retrieval_without_questions_is_a_clear_error():
    from tunesmith.errors import UserError

    with pytest.raises(UserError, match="retrieval"):
        Retriever([[{"role": "text", "content": "raw text only"}]])
