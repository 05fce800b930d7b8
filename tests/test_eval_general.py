"""General-ability probes: the multiple-choice scorer (acc, acc_norm as lm-evaluation-harness
defines them), log-likelihoods with a shared context, GSM8K's final number, the shipped probe,
and base-vs-tuned differences with the margin warning."""
import json

import numpy as np
import pytest
import torch

from tunesmith.eval.general import (MULTIPLE_CHOICE, SETS, choice_prompt, choice_scores, compare_probe, format_probe,
                                    load_probe, main_metric, number_in, same_number, warnings)
from tunesmith.eval.likelihood import continuation_ids, loglikelihoods
from tunesmith.errors import UserError
from tunesmith.models import load_model


def test_acc_and_acc_norm_on_known_log_likelihoods():
    # Summed log-likelihoods favour the short choice; per character the long one is likelier.
    choices = ["no", "a much longer answer"]  # 2 and 20 characters
    lls = [-3.0, -20.0]  # per character: -1.5 and -1.0
    assert choice_scores(lls, choices, answer=0) == {"acc": 1.0, "acc_norm": 0.0}
    assert choice_scores(lls, choices, answer=1) == {"acc": 0.0, "acc_norm": 1.0}
    # A tie goes to the first choice, as numpy's argmax (and the harness) decide it.
    assert choice_scores([-1.0, -1.0], ["ab", "cd"], answer=0) == {"acc": 1.0, "acc_norm": 1.0}
    # An empty choice (TruthfulQA has some) scores -inf per character: never chosen, no warning printed.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choice_scores([-0.5, -4.0], ["", "yes"], answer=1) == {"acc": 0.0, "acc_norm": 1.0}


@torch.no_grad()
def naive_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """The plain definition: one forward of context + continuation, summed log-probabilities."""
    head, tail = continuation_ids(tokenizer, context, continuation)
    ids = torch.tensor([head + tail])
    logits = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return float(sum(logits[len(head) - 1 + j, t] for j, t in enumerate(tail)))


def test_shared_context_log_likelihoods_equal_one_forward_per_choice(tiny_model_dir, tiny_tokenizer):
    model = load_model(str(tiny_model_dir))
    prompts = [("Question: My PixelPad froze?\nAnswer:", ["technical", "billing", "a refund please", "x"]),
               ("Hi team,", ["urgent", "low priority, no rush at all"]),
               ("Ticket: order #4821 late. Category:", ["shipping"])]
    found = loglikelihoods(model, tiny_tokenizer, prompts)
    for (context, choices), values in zip(prompts, found):
        expected = [naive_loglikelihood(model, tiny_tokenizer, context, " " + c) for c in choices]
        assert values == pytest.approx(expected, abs=1e-4)
    assert all(v < 0 for values in found for v in values)


def test_log_likelihoods_through_the_training_fast_paths_equal_the_plain_model(tiny_model_dir, tiny_tokenizer):
    """In a run the probe scores the trainable model with the fast paths installed (their attention
    takes the shared-context mask): the same log-likelihoods as the plain model."""
    from helpers import trainable

    prompts = [("Question: My PixelPad froze?\nAnswer:", ["technical", "billing", "a refund please"]),
               ("Hi team,", ["urgent", "low priority, no rush at all"])]
    plain = loglikelihoods(load_model(str(tiny_model_dir)), tiny_tokenizer, prompts)
    fast = loglikelihoods(trainable(load_model(str(tiny_model_dir))), tiny_tokenizer, prompts)
    for a, b in zip(plain, fast):
        assert b == pytest.approx(a, abs=1e-4)


def test_continuation_tokens_are_cut_from_the_whole_text(tiny_tokenizer):
    head, tail = continuation_ids(tiny_tokenizer, "Answer: ", "billing")  # the space moves to the continuation
    assert tiny_tokenizer.decode(head) == "Answer:" and tiny_tokenizer.decode(tail) == " billing"
    assert head + tail == tiny_tokenizer("Answer: billing", add_special_tokens=False)["input_ids"]


def test_prompts_follow_the_harness_templates():
    item = {"question": "What is 2+2?", "choices": ["3", "4"], "answer": 1, "subject": "elementary_mathematics"}
    assert choice_prompt("arc_easy", item) == ("Question: What is 2+2?\nAnswer:", ["3", "4"])
    context, letters = choice_prompt("mmlu", item)
    assert context == ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                       "What is 2+2?\nA. 3\nB. 4\nAnswer:") and letters == ["A", "B"]
    context, choices = choice_prompt("truthfulqa_mc1", item)
    assert context.startswith("Q: What is human life expectancy") and context.endswith("\n\nQ: What is 2+2?\nA:")


def test_gsm8k_final_number():
    assert number_in("She has 3 apples, then 5. So the answer is 1,250.") == "1250"
    assert number_in("It costs $18.") == "18"
    assert number_in("no number here") is None
    assert same_number("18.0", "18") and not same_number("17", "18") and not same_number(None, "1")


def test_shipped_probe_is_stratified_and_complete():
    probe = load_probe()
    assert set(probe) == set(SETS)
    for name, items in probe.items():
        assert len(items) == (100 if name == "gsm8k" else 200)
        assert len({i["id"] for i in items}) == len(items)
        if name in MULTIPLE_CHOICE:
            assert all(0 <= i["answer"] < len(i["choices"]) for i in items)
    subjects = {i["subject"] for i in probe["mmlu"]}
    assert len(subjects) >= 50  # 57 subjects, each with its share of 200 items
    assert len(load_probe(sets=["arc_easy"], limit=7)["arc_easy"]) == 7
    with pytest.raises(UserError, match="unknown probe set"):
        load_probe(sets=["nope"])


def test_own_probe_folder(tmp_path):
    (tmp_path / "arc_easy.jsonl").write_text(json.dumps({"id": "1", "question": "q", "choices": ["a", "b"],
                                                         "answer": 0}) + "\n")
    assert list(load_probe(str(tmp_path))) == ["arc_easy"]
    with pytest.raises(UserError, match="not found"):
        load_probe(str(tmp_path), sets=["hellaswag"])
    (tmp_path / "hellaswag.jsonl").write_text("\n")  # empty: no set, and named, a clear refusal
    assert list(load_probe(str(tmp_path))) == ["arc_easy"]
    with pytest.raises(UserError, match="hellaswag.jsonl: the probe file holds no items"):
        load_probe(str(tmp_path), sets=["hellaswag"])
    (tmp_path / "hellaswag.jsonl").write_text('{"id": "1"}\n{broken\n')
    with pytest.raises(UserError, match="hellaswag.jsonl:2: not a JSON line"):
        load_probe(str(tmp_path))


def test_differences_in_points_and_the_margin_warning():
    rng = np.random.default_rng(0)
    base = {"arc_easy": [{"acc": float(x), "acc_norm": float(x)} for x in rng.random(200) < 0.6],
            "gsm8k": [{"exact_match": 0.0}] * 50}
    tuned_arc = [dict(r) for r in base["arc_easy"]]
    for r in tuned_arc[:30]:  # 30 of 200 items newly wrong, where they were right: at most -15 points
        r["acc_norm"] = 0.0
    tuned = {"arc_easy": tuned_arc, "gsm8k": [{"exact_match": 0.0}] * 50}
    rows = {(r["set"], r["metric"]): r for r in compare_probe(base, tuned, samples=500, margin=2.0)}
    arc = rows[("arc_easy", "acc_norm")]
    lost = sum(r["acc_norm"] for r in base["arc_easy"][:30])
    assert arc["difference"] == pytest.approx(-100 * lost / 200)
    assert arc["high"] < 0 and arc["lost"] and arc["main"] and arc["loss"] == lost
    assert not rows[("arc_easy", "acc")]["main"] and rows[("arc_easy", "acc")]["difference"] == 0
    assert not rows[("gsm8k", "exact_match")]["lost"]
    pooled = rows[("all", "main")]  # 250 items, each by its set's main metric (acc_norm, exact match)
    assert pooled["items"] == 250 and pooled["difference"] == pytest.approx(-100 * lost / 250)
    lines = warnings(list(rows.values()), 2.0)
    assert "arc_easy acc_norm" in lines[0] and "eval.general_margin=2" in lines[0]
    assert len(lines) == (2 if lost / 250 > 0.02 else 1)
    assert "arc_easy acc_norm" in format_probe(list(rows.values()))
    few = compare_probe({"arc_easy": base["arc_easy"][:10]}, {"arc_easy": base["arc_easy"][:10]}, samples=100)
    # no item changed, yet ten items cannot tell a change of 10 points from none: Newcombe's interval, not [0, 0]
    (same,) = [r for r in few if r["main"]]
    assert same["difference"] == 0 and same["low"] < -10 and same["high"] > 10
    said = warnings(few, 2.0)
    assert said == ["note: arc_easy has 10 items; one item is 10 points or more there, and an interval over so few "
                    "items speaks of those items only (raise eval.general_limit or --general-limit)"]


def test_a_loss_past_the_margin_within_noise_is_said_so():
    """One item of 20 newly wrong is 5 points, past the default margin of 2, but its interval holds 0: the
    warning says the loss may be noise, where a loss the interval confirms is said as a loss."""
    base = {"arc_easy": [{"acc": 1.0, "acc_norm": 1.0}] * 10 + [{"acc": 0.0, "acc_norm": 0.0}] * 10}
    tuned = {"arc_easy": [{"acc": 1.0, "acc_norm": 0.0}] + base["arc_easy"][1:]}
    rows = compare_probe(base, tuned, margin=2.0)
    main = next(r for r in rows if r["main"])
    assert main["difference"] == pytest.approx(-5.0) and main["lost"] and main["low"] < 0 < main["high"]
    said = warnings(rows, 2.0)[0]
    assert "lost 5.0 points of arc_easy acc_norm" in said and "includes 0: it may be noise" in said
    clear = {"arc_easy": [{"acc": 1.0, "acc_norm": 0.0}] * 10 + base["arc_easy"][10:]}
    confirmed = warnings(compare_probe(base, clear, margin=2.0), 2.0)[0]
    assert "lost 50.0 points" in confirmed and "noise" not in confirmed


def test_hellaswag_context_is_capitalised_as_the_harness_writes_it():
    """The harness's HellaSwag query is activity_label + ': ' + ctx_a + ' ' + ctx_b.capitalize(); the
    probe's text keeps the data set's lower-case ctx_b ('... on a roof. he'), as the shared copy does."""
    item = {"question": "Roof shingle removal: A man is sitting on a roof. he", "choices": ["a", "b"], "answer": 0}
    assert choice_prompt("hellaswag", item)[0] == "Roof shingle removal: A man is sitting on a roof. He"
    empty_ctx_a = {**item, "question": "Surfing: the man"}
    assert choice_prompt("hellaswag", empty_ctx_a)[0] == "Surfing: The man"
    for whole in ("Personal Care and Style: Know what you desire. What you want is the first thing.",  # WikiHow
                  "Finance: You can adopt a child born in the u.s. or one born in a different country.",
                  "Roof shingle removal: A man is sitting on a roof. He"):  # already the harness's text
        assert choice_prompt("hellaswag", {**item, "question": whole})[0] == whole
    shipped = load_probe(sets=["hellaswag"])["hellaswag"]
    changed = [i for i in shipped if choice_prompt("hellaswag", i)[0] != i["question"]]
    assert len(changed) == 63  # the ActivityNet items whose ctx_b the data set keeps in lower case


def test_each_sets_reported_figure_is_the_harness_main_metric():
    """The figure per set (and the pooled 'all' row) is what lm-evaluation-harness reports for it
    (docs/evaluation.md): acc_norm for ARC and HellaSwag, acc for MMLU and TruthfulQA MC1 (the
    harness gives no acc_norm there), exact match for GSM8K. On items where the two disagree the
    pooled row must count each set by its own."""
    assert {name: main_metric(name) for name in SETS} == {
        "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "mmlu": "acc",
        "truthfulqa_mc1": "acc", "gsm8k": "exact_match"}
    base = {name: [{"acc": 1.0, "acc_norm": 0.0}] * 4 for name in ("mmlu", "hellaswag", "truthfulqa_mc1")}
    rows = compare_probe(base, base, samples=50)
    assert {(r["set"], r["metric"]) for r in rows if r["main"]} == {
        ("mmlu", "acc"), ("hellaswag", "acc_norm"), ("truthfulqa_mc1", "acc"), ("all", "main")}
    pooled = next(r for r in rows if r["set"] == "all")
    assert pooled["base"] == pytest.approx(100 * 8 / 12)  # acc 1 on mmlu and truthfulqa, acc_norm 0 on hellaswag


def test_eval_general_scores_an_adapter_against_its_base(tiny_model_dir, tmp_path, capsys):
    """`tunesmith eval ADAPTER --general`: the base (adapter switched off) and the adapter model on the
    same items; a plain model gets its own scores only."""
    from tunesmith.cli import main
    from tunesmith.models import load_tokenizer

    from helpers import lora_model, write_jsonl

    probe = tmp_path / "probe"
    probe.mkdir()
    for name, items in load_probe(sets=["arc_easy", "hellaswag"], limit=4).items():
        write_jsonl(probe / f"{name}.jsonl", items)
    adapter = tmp_path / "adapter"
    lora_model(load_model(str(tiny_model_dir)), fast_paths=False).save_pretrained(adapter)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(adapter)
    assert main(["eval", str(adapter), "--general", "--general-data", str(probe), "--general-margin", "0"]) == 0
    result = json.loads(capsys.readouterr().out)["general"]
    assert result["items"] == {"arc_easy": 4, "hellaswag": 4}
    rows = {(d["set"], d["metric"]) for d in result["differences"]}
    assert {("arc_easy", "acc_norm"), ("hellaswag", "acc"), ("all", "main")} <= rows
    assert main(["eval", str(tiny_model_dir), "--general", "--general-data", str(probe)]) == 0
    plain = json.loads(capsys.readouterr().out)["general"]
    assert set(plain["model"]) == {"arc_easy/acc", "arc_easy/acc_norm", "hellaswag/acc", "hellaswag/acc_norm"}
    assert main(["eval", str(tiny_model_dir)]) == 2  # neither --data nor --general
    # A misspelt probe set is refused before the test answers are generated (it came after them).
    data = write_jsonl(tmp_path / "test.jsonl", [{"question": "q?", "answer": "a"}])
    assert main(["eval", str(tiny_model_dir), "--data", str(data), "--general", "--general-sets", "arc_easyy"]) == 2
    said = capsys.readouterr().err
    assert "unknown probe set(s) ['arc_easyy']" in said and "generate" not in said, said


def test_eval_general_of_a_run_is_kept_in_it_and_shown_by_its_report(tiny_model_dir, tmp_path, capsys):
    """`eval RUN --general` printed its table and went nowhere: the run's report and model card, which
    answer "did it keep its general ability?", never showed it."""
    import yaml

    from helpers import lora_model, write_jsonl
    from test_report import fake_run
    from tunesmith.cli import main
    from tunesmith.models import load_tokenizer

    probe = tmp_path / "probe"
    probe.mkdir()
    for name, items in load_probe(sets=["arc_easy"], limit=4).items():
        write_jsonl(probe / f"{name}.jsonl", items)
    run = fake_run(tmp_path / "run")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}}))
    lora_model(load_model(str(tiny_model_dir)), fast_paths=False).save_pretrained(run / "adapter")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(run / "adapter")
    assert main(["eval", str(run), "--general", "--general-data", str(probe)]) == 0
    printed = json.loads(capsys.readouterr().out)["general"]
    assert json.loads((run / "general.json").read_text()) == printed
    assert "General ability kept?" in (run / "report.html").read_text()
    from tunesmith.runs import RunFolder

    assert RunFolder(run).read_results()["general"] == printed  # what the card and the report read


@pytest.mark.parametrize("name, starts", [("gemma3", True), ("llama3", True), ("qwen2.5", False)])
def test_probe_texts_start_as_the_tokenizer_starts_a_text(family_dirs, name, starts):
    """Where the tokenizer puts BOS before every text (Gemma, Llama 3), the probes' contexts and
    GSM8K's prompts begin with it as pre-training's texts did; Qwen's tokenizer adds none."""
    import types

    from tunesmith.eval.general import gsm8k_rows

    tokenizer = family_dirs(name)[1]
    head, tail = continuation_ids(tokenizer, "Question: 2+2?\nAnswer:", " 4")
    bos = [tokenizer.bos_token_id] if starts else []
    assert head == bos + tokenizer("Question: 2+2?\nAnswer:", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tail).strip() == "4"

    seen = []

    class Model(torch.nn.Module):  # records the prompt generation starts from
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = types.SimpleNamespace(eos_token_id=None)

        def generate(self, input_ids, attention_mask, **_):
            seen.append(input_ids[0][attention_mask[0].bool()].tolist())
            return input_ids

    gsm8k_rows(Model(), tokenizer, [{"question": "2+2?", "final": "4"}])
    assert seen == [bos + tokenizer("Question: 2+2?\nAnswer:", add_special_tokens=False)["input_ids"]]
