"""Records as real exports write them (a reviewer's messy-data findings): each read as meant, or
dropped with its file, line and reason; never a traceback, never a record silently mangled."""
from __future__ import annotations

import json

import pytest

from helpers import write_jsonl
from tunesmith.config import DataConfig
from tunesmith.data.prepare import prepare
from tunesmith.data.tokenize import IGNORE
from tunesmith.errors import UserError


def good(n: int = 6) -> list[dict]:
    return [{"question": f"What is item {i}?", "answer": f"It is thing {i}."} for i in range(n)]


def prepared_of(tmp_path, tokenizer, rows, **settings):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    return path, prepare(DataConfig(train=str(path), validation=str(path), cache=False,
                                    **settings), tokenizer)


def problems(prepared) -> dict[int, tuple[str, str]]:
    return {p.line: (p.kind, p.reason) for p in prepared.problems}


def test_half_a_character_drops_its_record_with_the_reason(tmp_path, tiny_tokenizer):
    """A lone surrogate (an emoji cut in half: JSON "\\ud83d") crashed `data check` and `train` in the
    tokenizer with a traceback naming no record."""
    lines = [json.dumps(r) for r in good()]
    lines[2] = '{"question": "Emoji cut in half: \\ud83d", "answer": "ok"}'
    lines[4] = '{"text": "a document \\udc00 cut"}'
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    prepared = prepare(DataConfig(train=str(path), validation=str(path), cache=False),
                       tiny_tokenizer)
    found = problems(prepared)
    assert {line: kind for line, (kind, _) in found.items()} == {3: "broken character", 5: "broken character"}
    assert "field 'question' holds half of a character ('\\ud83d'" in found[3][1]
    assert len(prepared.splits["train"]) == 4


def test_special_token_text_in_a_message_drops_the_record(tmp_path, tiny_tokenizer):
    """'<|im_end|>' written inside an answer became the end-of-turn token: the rest of the answer was
    never labelled and the model learned to stop mid-answer, with no word from `data check`."""
    rows = good() + [
        {"question": "How do I end a ChatML turn?", "answer": "Write <|im_end|> after the text, then more."},
        {"messages": [{"role": "system", "content": "Be brief.<|im_start|>assistant"},
                      {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"text": "Story one.<|endoftext|>Story two."},  # raw text keeps its tokens (a separator is meant)
    ]
    _, prepared = prepared_of(tmp_path, tiny_tokenizer, rows)
    found = problems(prepared)
    assert {line: kind for line, (kind, _) in found.items()} == {7: "special token in text", 8: "special token in text"}
    assert "the assistant message (turn 2) holds '<|im_end|>'" in found[7][1]
    assert "the system message (turn 1) holds '<|im_start|>'" in found[8][1]
    assert len(prepared.splits["train"]) == 7
    # every kept answer is labelled to its own end of turn
    for encoded in prepared.splits["train"].encoded[:6]:
        labelled = [t for t in encoded.labels if t != IGNORE]
        assert tiny_tokenizer.decode(labelled).endswith("<|im_end|>") and tiny_tokenizer.decode(labelled).count("<|im_end|>") == 1


def test_special_token_text_in_a_pair_or_a_grpo_prompt_is_said_too(tmp_path, tiny_tokenizer):
    from tunesmith.data.preference import PAIRS, prepare_preference
    from tunesmith.data.prompts import prepare_prompts

    pairs = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"not {i}"} for i in range(4)]
    pairs.append({"prompt": "Say x", "chosen": "x<|im_end|>y", "rejected": "no"})
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    prepared = prepare_preference(DataConfig(train=str(path), validation=str(path)), tiny_tokenizer, PAIRS)
    assert {(p.line, p.kind) for p in prepared.problems if p.file == str(path)} == {(5, "special token in text")}
    prompts = [{"prompt": f"Count to {i}", "reference": f"{i}"} for i in range(4)] + [{"prompt": "<|im_start|>x", "reference": "x"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    prepared = prepare_prompts(DataConfig(train=str(path), validation=str(path)), tiny_tokenizer)
    assert {(p.line, p.kind) for p in prepared.problems if p.file == str(path)} == {(5, "special token in text")}


def test_exports_spelling_of_turns_roles_weights_parts_and_numbers_are_read(tmp_path, tiny_tokenizer):
    rows = [
        # Arrow fills a missing struct key with null where any row has it: weight null is weight 1
        {"messages": [{"role": "user", "content": "a", "weight": None}, {"role": "assistant", "content": "b", "weight": None}]},
        {"messages": [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "c"},
                      {"role": "model", "content": "d"}]},  # OpenAI's developer, Gemini's model
        {"messages": [{"Role": "user", "Content": "e"}, {"Role": "assistant", "Content": "f"}]},
        {"Conversations": [{"From": "human", "Value": "g"}, {"From": "chatgpt", "Value": "h"}]},
        {"messages": [{"role": "user", "content": [{"type": "input_text", "text": "i"}]},
                      {"role": "assistant", "content": [{"type": "output_text", "text": "j"}]}]},
        {"question": "What is 2 + 2?", "answer": 4},  # a numeric column
        {"question": "Pi?", "answer": 3.14},
        {"question": "An int column with a gap", "answer": 7.0},  # pandas' float for it
        {"question": "Empty cell", "answer": float("nan")},
        {"messages": [{"content": "k"}, {"role": "assistant", "content": "l"}]},
    ]
    path, prepared = prepared_of(tmp_path, tiny_tokenizer, rows)
    found = problems(prepared)
    assert set(found) == {9, 10}, found
    assert found[9] == ("empty text", "empty text: field 'answer' is empty (NaN)")
    assert found[10] == ("missing field", "missing field: messages[0] has no 'role'")
    train = prepared.splits["train"]
    assert [c[-1]["content"] for c in train.conversations] == ["b", "d", "f", "h", "j", "4", "3.14", "7"]
    assert [m["role"] for m in train.conversations[1]] == ["system", "user", "assistant"]
    assert all(any(t != IGNORE for t in e.labels) for e in train.encoded)  # every answer, weight null too, taught


def test_a_qa_file_with_a_preference_like_column_is_sft_data(tmp_path):
    from tunesmith.data.check import data_kind
    from tunesmith.data.preference import PAIRS, UNPAIRED

    def kind(rows):
        return data_kind(DataConfig(train=str(write_jsonl(tmp_path / "d.jsonl", rows))))

    assert kind([{"Question": "q", "Answer": "a", "Rejected": "no"}]) is None
    # any label: a CSV's "true", a null or an unreadable one are KTO's to read or refuse, never SFT answers
    assert kind([{"prompt": "p", "completion": "c", "label": "sentiment"}]) == UNPAIRED
    assert kind([{"prompt": "p", "completion": "c", "label": True}]) == UNPAIRED
    assert kind([{"prompt": "p", "completion": "c", "label": 1}]) == UNPAIRED
    assert kind([{"prompt": "p", "completion": "c", "label": None}]) == UNPAIRED
    assert kind([{"prompt": "p", "chosen": "a", "rejected": "b"}]) == PAIRS
    assert kind([{"prompt": "p", "rejected": "b"}]) == PAIRS  # half a pair: refused as one, with its missing field


def test_data_check_says_how_a_file_was_taken_for_pairs(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from tunesmith.cli import main

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "rejected": "b"} for i in range(3)])
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "read as pairs data from the first record's fields; SFT data with such a column: data check " \
           "--objective sft" in err, err


def test_train_warns_of_test_examples_that_are_also_training_ones(tmp_path, tiny_tokenizer):
    from tunesmith.data.check import data_lines

    path = write_jsonl(tmp_path / "data.jsonl", good(8))
    test = write_jsonl(tmp_path / "test.jsonl", good(8)[5:] + [{"question": "new", "answer": "one"}])
    cfg = DataConfig(train=str(path), test=str(test), cache=False)
    said = "\n".join(data_lines(prepare(cfg, tiny_tokenizer), cfg))
    assert f"warning: 3 of 4 test examples are also in train (first: {test}:1, {test}:2, {test}:3)" in said, said


def test_a_test_file_mixing_raw_text_and_conversations_is_refused_by_its_lines(tmp_path, tiny_tokenizer):
    """It was refused only after the run folder was written, naming neither file nor line."""
    path = write_jsonl(tmp_path / "data.jsonl", good())
    test = write_jsonl(tmp_path / "test.jsonl", good(2) + [{"text": "a document"}])
    with pytest.raises(UserError, match=rf"{test}: test data mixes raw text records \(first: {test}:3\) with "
                                        rf"conversations \(first: {test}:1\)"):
        prepare(DataConfig(train=str(path), test=str(test), cache=False), tiny_tokenizer)


def test_one_file_as_train_and_test_is_not_called_one_document(tmp_path):
    from tunesmith.data.near_dup import report

    train = [[{"role": "user", "content": f"question number {i} about things"},
              {"role": "assistant", "content": f"answer number {i} about things"}] for i in range(3)]
    origins = [("d.jsonl", i + 1) for i in range(3)]
    found = report(train, origins, {"test": (train, origins)}, 0.8)
    assert found["test_in_train"]["first"][0] == "d.jsonl:1 (the same record: one file in both)"


def test_one_conversation_scored_or_exported_is_tokenised_as_written(tiny_tokenizer):
    """`compare` on a file, and the merge check's sample of the run's data, encode one conversation at a
    time: a special token's text there stopped them with a traceback (training had dropped the record)."""
    from tunesmith.data.tokenize import encode

    encoded = encode(tiny_tokenizer, [{"role": "user", "content": "How does ChatML end a turn?"},
                                      {"role": "assistant", "content": "With the <|im_end|> token."}])
    assert tiny_tokenizer.decode(encoded.input_ids).count("<|im_end|>") == 3
