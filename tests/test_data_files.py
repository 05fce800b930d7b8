"""User data files: every format becomes chat messages; bad lines are reported with file, line, reason."""
import pytest

from tunesmith.config import DataConfig
from tunesmith.data.prepare import prepare
from tunesmith.errors import UserError

from conftest import write_jsonl

GOOD = [
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    {"conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris"}]},
    {"instruction": "Translate to French", "input": "cat", "output": "chat"},
    {"prompt": "Say hi", "completion": "hi"},
    {"question": "Color of the sky?", "answer": "blue"},
]


def test_each_format_is_read(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD * 4)
    prepared = prepare(DataConfig(train=str(path)), tiny_tokenizer)
    total = len(prepared.splits["train"]) + len(prepared.splits["validation"])
    assert total == 20 and not prepared.problems
    assert all(e.label_count > 0 for e in prepared.splits["train"].encoded)


def test_bad_lines_are_reported_and_skipped(tmp_path, tiny_tokenizer):
    rows = GOOD + ['{"messages": [', '[1, 2]', {"prompt": "", "completion": "x"},
                   {"messages": [{"role": "robot", "content": "x"}]}, {"text_only": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare(DataConfig(train=str(path)), tiny_tokenizer)
    found = {p.line: p.reason for p in prepared.problems}
    assert set(found) == {6, 7, 8, 9, 10}
    assert "broken JSON" in found[6] and "expected a JSON object" in found[7]
    assert "'prompt' is empty" in found[8] and "unknown role 'robot'" in found[9]
    assert all(str(p).startswith(f"{path}:") for p in prepared.problems)


def test_no_valid_example_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"oops"', {"prompt": 3, "completion": "x"}])
    with pytest.raises(UserError, match="no usable training examples"):
        prepare(DataConfig(train=str(path)), tiny_tokenizer)


def test_missing_file_is_a_user_error(tiny_tokenizer):
    with pytest.raises(UserError, match="data file not found"):
        prepare(DataConfig(train="/no/such/file.jsonl"), tiny_tokenizer)
