"""Each generation metric on hand-made cases, and the user's own scorer."""
import json

import pytest

from tunesmith.errors import UserError
from tunesmith.eval.metrics import (example_scores, json_example_scores, load_scorer, mean_scores, normalise,
                                    parse_json_object, rouge_l, squad_normalise, text_example_scores, token_f1)


def test_exact_and_normalised_exact_match():
    rows = example_scores(["Paris.", "paris", "Lyon"], ["Paris.", "Paris", "Paris"])  # SQuAD's normalisation
    assert [r["exact_match"] for r in rows] == [1.0, 0.0, 0.0]
    assert [r["normalised_exact_match"] for r in rows] == [1.0, 1.0, 0.0]
    assert normalise("  Hello,   World!! ") == "hello world"


def test_token_f1_by_hand():
    # SQuAD's normalisation drops the articles: prediction "cat sat" (2), reference "cat sat down" (3).
    assert token_f1("The cat sat", "the cat sat down") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)  # overlap counted with multiplicity: x, y
    assert token_f1("a x x b", "x x c") == pytest.approx(2 / 3)  # both x count: a set overlap would give 1/2
    assert token_f1("x x", "x") == pytest.approx(2 / 3)  # precision 1/2, recall 1 (a set: 1.0)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0
    assert token_f1("The", "a") == 1.0  # nothing but articles on both sides: both empty


def test_squad_normalisation():
    """The official SQuAD v1.1 script's normalize_answer: lower case, punctuation (string.punctuation)
    removed rather than split on, articles removed, white space collapsed."""
    assert squad_normalise("  The Eiffel-Tower, in   Paris!! ") == "eiffeltower in paris"
    assert squad_normalise("An apple a day") == "apple day"
    assert squad_normalise("theatre anatomy") == "theatre anatomy"  # only whole words are articles
    rows = example_scores(["the Eiffel Tower."], ["Eiffel tower"])
    assert rows[0]["normalised_exact_match"] == 1.0 and rows[0]["exact_match"] == 0.0


def test_rouge_l_by_hand():
    # LCS of "a b c d e" and "a c e f": a c e = 3; precision 3/5, recall 3/4.
    assert rouge_l("a b c d e", "a c e f") == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert rouge_l("the cat", "the cat") == 1.0
    assert rouge_l("cat the", "the cat") == pytest.approx(0.5)  # order matters, unlike token F1
    assert token_f1("cat the", "the cat") == 1.0
    assert rouge_l("x y", "a b") == 0.0


def test_rouge_l_equals_rouge_score():
    """ROUGE-L is the rouge-score package's rougeL F-measure (default tokeniser, no stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("Glaucoma damages the optic nerve, often with high eye pressure.",
              "Glaucoma is a group of diseases that can damage the eye's optic nerve."),
             ("Diabetes: high blood-sugar (glucose) levels!", "diabetes means blood glucose is too high"),
             ("Café au lait spots", "cafe au lait spots"), ("", "something"), ("12 mg/dL", "12 mg per dL")]
    for prediction, reference in pairs:
        assert rouge_l(prediction, reference) == scorer.score(reference, prediction)["rougeL"].fmeasure


def test_rouge_l_reads_words_of_every_script():
    """rouge-score's default tokeniser keeps a-z and 0-9 only: a Russian or Chinese answer scored 0 against
    itself, so every example of such data tied and compare's verdict meant nothing."""
    assert rouge_l("Москва", "Москва") == rouge_l("東京です", "東京です") == rouge_l("Αθήνα", "Αθήνα") == 1.0
    assert rouge_l("Столица России Москва", "Москва") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    # Chinese and Japanese put no spaces between words: each character is one
    assert rouge_l("東京に行く", "京都に行く") == pytest.approx(0.8)  # LCS 京に行く: 4 of 5 characters
    assert rouge_l("Москва", "Париж") == 0.0
    # combining marks belong to their word (Devanagari's vowel signs and virama)
    assert rouge_l("नमस्ते दुनिया", "नमस्ते") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_json_validity_and_per_field_accuracy():
    reference = json.dumps({"category": "billing", "priority": "low"})
    assert json_example_scores('{"category": "billing", "priority": "high"}', reference) == {
        "json_valid": 1.0, "all_fields": 0.0, "field/category": 1.0, "field/priority": 0.0}
    assert json_example_scores("no json", reference)["json_valid"] == 0.0
    rows = example_scores([reference, "nope"], [reference, reference])
    assert mean_scores(rows) == {"json_valid": 0.5, "all_fields": 0.5, "field/category": 0.5, "field/priority": 0.5}
    assert "rouge_l" not in rows[0]



def test_json_fields_are_compared_as_json_and_strings_may_hold_braces():
    """true is not 1 (Python's == says so), a field's string may hold a brace, and an empty reference
    object is matched only by a JSON answer."""
    reference = json.dumps({"urgent": True, "reply": "Close it with }", "count": 1})
    assert json_example_scores('{"urgent": 1, "reply": "Close it with }", "count": 1.0}', reference) == {
        "json_valid": 1.0, "all_fields": 0.0, "field/urgent": 0.0, "field/reply": 1.0, "field/count": 1.0}
    assert json_example_scores(f"Sure: {reference} Done.", reference)["all_fields"] == 1.0
    assert parse_json_object('say "{name" then {"a": "}{"}') == {"a": "}{"}
    assert json_example_scores("no JSON at all", "{}") == {"json_valid": 0.0, "all_fields": 0.0}
    # A reference with a brace in a string keeps the whole set scored as JSON
    rows = example_scores([reference, "x"], [reference, json.dumps({"urgent": False, "reply": "{"})])
    assert [r["all_fields"] for r in rows] == [1.0, 0.0] and "rouge_l" not in rows[0]

def test_user_scorer_from_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def length_ratio(prediction, reference):\n    return len(prediction) / len(reference)\n"
        "def two(prediction, reference):\n    return {'starts_same': float(prediction[:1] == reference[:1]), 'one': 1}\n"
        "def broken(prediction, reference):\n    return 'high'\n"
        "def crashes(prediction, reference):\n    return len(prediction) / len(reference)\n"
        "import json\ndef parses(prediction, reference):\n    return json.loads(prediction)['score']\n")
    monkeypatch.chdir(tmp_path)
    rows = example_scores(["ab", "abcd"], ["abcd", "abcd"], load_scorer("my_metrics:length_ratio"), "length_ratio")
    assert [r["length_ratio"] for r in rows] == [0.5, 1.0]
    rows = example_scores(["x", "ab"], ["ab", "ab"], load_scorer(f"{tmp_path / 'my_metrics.py'}:two"))
    assert [r["starts_same"] for r in rows] == [0.0, 1.0] and rows[0]["one"] == 1.0
    with pytest.raises(UserError, match="expected a finite number"):
        example_scores(["a"], ["a"], load_scorer("my_metrics:broken"), "broken")
    # A scorer that raises: one line naming it, where it failed and on what (a traceback through
    # tunesmith's frames before)
    with pytest.raises(UserError) as raised:
        example_scores(["ab", "abc"], ["ab", ""], load_scorer("my_metrics:crashes"), "crashes")
    assert str(raised.value) == ("scorer 'my_metrics:crashes' failed: ZeroDivisionError: division by zero "
                                 "(my_metrics.py:8 in crashes) on the answer 'abc' with the reference ''")
    with pytest.raises(UserError, match=r"JSONDecodeError: .* \(my_metrics\.py:11 in parses\) on the answer 'x'"):
        example_scores(["x"], ["y"], load_scorer("my_metrics:parses"), "parses")  # its own line, not json's
    for spec, message in [("my_metrics", "expected 'module:function'"), ("no_such_module_xyz:f", "no module 'no_such_module_xyz' on the path"),
                          ("my_metrics:missing", "has no function 'missing'")]:
        with pytest.raises(UserError, match=message):
            load_scorer(spec)


def test_json_references_wrapped_in_prose_are_scored_not_a_crash():
    """Detected with parse_json_object, once parsed with json.loads: 'Answer: {...}' crashed scoring."""
    references = ['Answer: {"category": "billing", "priority": "low"}',
                  'The label is ```json\n{"category": "outage", "priority": "high"}\n```']
    answers = ['{"category": "billing", "priority": "high"}', 'Sure: {"category": "outage", "priority": "high"}']
    rows = example_scores(answers, references)
    assert rows == [{"json_valid": 1.0, "all_fields": 0.0, "field/category": 1.0, "field/priority": 0.0},
                    {"json_valid": 1.0, "all_fields": 1.0, "field/category": 1.0, "field/priority": 1.0}]
    assert json_example_scores("no json", references[0]) == {
        "json_valid": 0.0, "all_fields": 0.0, "field/category": 0.0, "field/priority": 0.0}


def test_tool_call_metrics_read_each_familys_wrapping():
    import json

    from tunesmith.eval.metrics import example_scores, parse_tool_calls

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    expected = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    answers = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',  # Qwen
               '{"name": "get_weather", "parameters": {"city": "Oslo"}}',  # Llama 3.1
               '[TOOL_CALLS][{"name": "get_weather", "arguments": "{\\"city\\": \\"Bergen\\"}"}]',  # Mistral
               '{"name": "get_weather", "arguments": {}}',  # missing required argument
               '{"name": "get_time", "arguments": {"city": "Oslo"}}',  # unknown function
               'It is sunny in Oslo.']
    assert parse_tool_calls(answers[2]) == [{"name": "get_weather", "arguments": {"city": "Bergen"}}]
    rows = example_scores(answers, [""] * 6, expected_calls=[expected] * 6, tools=[tools] * 6)
    assert [r["tool_call_valid"] for r in rows] == [1, 1, 1, 0, 0, 0]
    assert [r["tool_name_accuracy"] for r in rows] == [1, 1, 1, 1, 0, 0]
    assert [r["tool_arguments_exact"] for r in rows] == [1, 1, 0, 0, 0, 0]
    # Plain references beside tool-call ones keep their own scores.
    mixed = example_scores(["4", answers[0]], ["4", ""], expected_calls=[None, expected], tools=[None, tools])
    assert mixed[0]["exact_match"] == 1 and mixed[1]["tool_arguments_exact"] == 1
    assert json.dumps(rows[0])
    # A call the tool would reject for a type or an enum is not valid, though its name is right.
    tools[0]["function"]["parameters"]["properties"]["unit"] = {"type": "string", "enum": ["celsius", "fahrenheit"]}
    calls = ['{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}',
             '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "kelvin"}}',
             '{"name": "get_weather", "arguments": {"city": 47}}']
    rows = example_scores(calls, [""] * 3, expected_calls=[expected] * 3, tools=[tools] * 3)
    assert [(r["tool_call_valid"], r["tool_name_accuracy"]) for r in rows] == [(1, 1), (0, 1), (0, 1)]


def test_repetition_counts_the_word_4grams_an_answer_repeats():
    from tunesmith.eval.metrics import repetition

    assert repetition("the cause is unknown and the treatment is rest") == 0.0
    # 'a b c d a b c d': 5 four-grams, of which the last repeats the first
    assert repetition("a b c d a b c d") == pytest.approx(1 / 5)
    loop = "Symptoms include: " + "The ducts are usually located in the breast. " * 20
    assert repetition(loop) > 0.9 and repetition("including " + "- " * 40) > 0.9  # punctuation loops count
    assert repetition("too short") == 0.0 and repetition("") == 0.0
    assert repetition("A b C d a B c D") == repetition("a b c d a b c d")  # case does not hide a repeat
    assert "repetition" in text_example_scores("x", "y") and "repetition" not in json_example_scores('{"a": 1}', '{"a": 1}')


def test_looping_answers_are_warned_about_with_each_rows_count():
    from tunesmith.eval.baselines import baseline_table, format_baselines, looping_warning
    from tunesmith.eval.compare import Scored
    from tunesmith.eval.decoding import LoopGuard

    def row(name, values):
        return Scored(name, ["x"] * len(values), [{"rouge_l": 0.2, "answer_loss": 1.0, "repetition": v} for v in values],
                      [5] * len(values))

    base, tuned = row("base", [0.0] * 18 + [0.6, 0.1]), row("fine-tuned", [0.7] * 3 + [0.2] * 17)
    warning = looping_warning([base, tuned])
    assert warning.startswith("warning: 3 of 20 fine-tuned answers loop") and "base 1" in warning
    assert "eval.no_repeat_ngram_size: 4" in warning
    assert "they loop with repetition penalty 1.2 too" in looping_warning([tuned], LoopGuard(1.2))
    assert looping_warning([tuned, base]) is None  # 1 of 20: under a tenth
    table = baseline_table([base, tuned], samples=200)
    assert table["warnings"] == [warning] and format_baselines(table).endswith(warning)
    repeats = [d for d in table["differences"] if d["metric"] == "repetition"][0]
    assert repeats["loss"] > repeats["win"]  # more repetition is worse: lower is better


def test_an_answer_is_scored_after_its_reasoning_and_so_is_the_reference():
    """Qwen3's <think> is not a special token: a model trained on reasoning says it before the answer,
    and scored whole an exact 'Paris' read as 0 exact match. References with a reasoning block count
    their answer alone too; reasoning cut off unfinished is no answer."""
    from tunesmith.eval.scoring import conversation_scores

    question = {"role": "user", "content": "Capital of France?"}
    plain = [question, {"role": "assistant", "content": "Paris"}]
    reasoned = [question, {"role": "assistant", "content": "<think>It is Paris.</think>\n\nParis"}]
    answers = ["<think>\nThe capital is Paris.\n</think>\n\nParis", "Paris", "<think>The capital is Paris, or",
               "The capital is Paris.\n</think>\n\nParis"]  # the template opened the reasoning (DeepSeek-R1)
    rows = conversation_scores(answers, [plain, reasoned, plain, plain])
    assert [r["exact_match"] for r in rows] == [1.0, 1.0, 0.0, 1.0] and rows[2]["rouge_l"] == rows[2]["token_f1"] == 0.0


def test_a_scorer_cannot_replace_tunesmiths_own_figures_nor_fail_to_import_with_a_traceback(tmp_path, monkeypatch):
    """A scorer returning {'eval_loss': 0.0} replaced the real eval loss (8.44 -> 0.0), and a module with
    a syntax error, or one failing as it loads, ended in a traceback (walk-through 4)."""
    (tmp_path / "sneaky.py").write_text("def score(prediction, reference):\n    return {'rouge_l': 1.0, 'mine': 0.5}\n")
    (tmp_path / "typo.py").write_text("def score(prediction, reference)\n    return 1\n")
    (tmp_path / "raises.py").write_text("import os\nx = 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="returned 'rouge_l', the name of one of tunesmith's own figures"):
        example_scores(["a"], ["a"], load_scorer("sneaky:score"), "sneaky")
    with pytest.raises(UserError, match=r"module 'typo' failed as it was imported: SyntaxError: .* \(typo.py:1\)"):
        load_scorer("typo:score")
    with pytest.raises(UserError, match=r"failed as it was imported: ZeroDivisionError: division by zero \(raises.py:2\)"):
        load_scorer("raises:score")


def test_config_check_finds_the_code_a_config_names_without_running_it(tmp_path, monkeypatch, capsys):
    """`config --check` imported (ran) the modules of train.rewards and eval.scorer: checking a config
    from elsewhere ran its code."""
    from tunesmith.cli import main

    (tmp_path / "payload.py").write_text("open('ran', 'w').close()\ndef score(p, r):\n    return 1.0\n")
    (tmp_path / "c.yaml").write_text("eval:\n  scorer: payload:score\ntrain:\n  objective: grpo\n  rewards: [payload:score]\n")
    monkeypatch.chdir(tmp_path)
    assert main(["config", "--check", "c.yaml"]) == 0 and not (tmp_path / "ran").exists()
    (tmp_path / "c.yaml").write_text("eval:\n  scorer: payloda:score\n")
    assert main(["config", "--check", "c.yaml"]) == 2
    assert "no module 'payloda' on the path" in capsys.readouterr().err


def test_eval_says_a_mistyped_scorer_before_it_loads_the_model(tmp_path, monkeypatch):
    """`eval --scorer typo:score` loaded the model and generated every answer before it said so."""
    import tunesmith.runs as runs
    from tunesmith.measure import evaluate

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded first")

    monkeypatch.setattr(runs, "load_trained", loaded)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(UserError, match="no module 'typo_xyz' on the path"):
        evaluate("default", str(data), scorer="typo_xyz:score")
