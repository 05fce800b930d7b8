"""A comparison over too few examples says so (walk-through 2): from one test example compare said
"default beats fine-tuning by +0.010 [+0.010, +0.010]" (a bootstrap over one example has no width, so
any difference "excluded 0"), and from three a strong verdict, without a word. Now: under 20 examples
(the size docs/evaluation.md's coverage was simulated from) a note, the verdict marked; with one example
no interval and no verdict. The general-ability probe notes its sets under 20 items likewise."""
from __future__ import annotations

import json

from helpers import write_jsonl
from tunesmith.eval.baselines import baseline_table, format_baselines
from tunesmith.eval.compare import Scored, format_table


def scored(name: str, values: list[float]) -> Scored:
    return Scored(name, ["x"] * len(values), [{"rouge_l": v, "answer_loss": 1.0 + v} for v in values],
                  [5] * len(values))


def test_one_example_gives_no_interval_and_no_verdict():
    table = baseline_table([scored("base", [0.5]), scored("fine-tuned", [0.49])], samples=200)
    assert table["verdict"] == ""
    assert table["warnings"] == ["note: 1 example: no interval and no verdict (a difference over one example says "
                                 "nothing of the next, and a bootstrap over it has no width); compare on 20 or more"]
    for text in (format_table(table), format_baselines(table)):
        assert "beats" not in text and "verdict:" not in text and "[-0.010, -0.010]" not in text
        assert "[no interval: 1 example]" in text and text.endswith(table["warnings"][0])


def test_a_few_examples_get_a_note_and_a_marked_verdict():
    table = baseline_table([scored("base + retrieval", [0.9, 0.95, 1.0]), scored("fine-tuned", [0.2, 0.3, 0.35])],
                           samples=200)
    assert table["verdict"].startswith("base + retrieval beats fine-tuning by +0.667")
    assert table["verdict"].endswith("rouge_l: consider it instead (over 3 examples only: see the note)")
    assert table["warnings"][0].startswith("note: only 3 examples: intervals over fewer than 20 are unreliable")
    assert "[+" in format_baselines(table)  # the interval is still shown, beside the note
    # from 20 on: neither
    table = baseline_table([scored("base", [0.1] * 20), scored("fine-tuned", [0.5 + 0.01 * (i % 3) for i in range(20)])],
                           samples=200)
    assert table["warnings"] == [] and table["verdict"].startswith("fine-tuning beats base by +0.4")
    assert table["verdict"].endswith("rouge_l")


def test_compare_of_one_example_says_why_it_has_no_verdict_and_records_it(tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "one.jsonl", [{"question": "Ticket: screen dead", "answer": "technical"}])
    assert main(["compare", str(tiny_model_dir), str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "2",
                 "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "verdict:" not in text and "note: 1 example: no interval and no verdict" in text
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["verdict"] == "" and saved["warnings"][0].startswith("note: 1 example")
