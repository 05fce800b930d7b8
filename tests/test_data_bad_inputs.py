"""The bad-input corpus (tests/bad_data): every malformed file gets its reason in one line, never a traceback."""
from pathlib import Path

import pytest

from tunesmith.cli import main

CORPUS = Path(__file__).parent / "bad_data"
EXPECTED = {
    "broken_json.jsonl": ":1: broken JSON",
    "not_an_object.jsonl": ":1: not a JSON object",
    "missing_completion.jsonl": ":1: missing field: 'completion'",
    "prompt_not_text.jsonl": ":1: wrong type: field 'prompt' must be text, got int",
    "empty_prompt.jsonl": ":1: empty text: field 'prompt' is empty",
    "unknown_role.jsonl": ":1: unknown role: 'wizard'",
    "no_assistant_turn.jsonl": ":1: no assistant turn",
    "messages_not_a_list.jsonl": ":1: wrong type: 'messages' must be a list, got str",
    "empty_messages.jsonl": ":1: empty text: 'messages' is an empty list",
    "turn_without_content.jsonl": ":1: missing field: messages[0].content is missing",
    "sharegpt_empty_answer.jsonl": ":1: empty text: conversations[1].value is empty",
    "instruction_input_not_text.jsonl": ":1: wrong type: field 'input' must be text, got list",
    "unknown_format.jsonl": ":1: unknown format: no known fields (keys: title)",
    "csv_extra_cell.csv": ":2: malformed CSV row",
    "truncated.json": ":1: broken JSON",
    "json_not_a_list.json": ":1: expected a JSON list of records",
    "not_utf8.jsonl": ": not UTF-8 text",
    "not_parquet.parquet": ": not a readable parquet file",
    "wrong_suffix.txt": ": unsupported data file type '.txt'",
}


def test_corpus_is_complete():
    assert len(list(CORPUS.iterdir())) >= 15
    assert set(EXPECTED) | {"duplicates_only_one_kept.jsonl"} == {p.name for p in CORPUS.iterdir()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_bad_file_gets_its_reason_in_one_line(name, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    path = CORPUS / name
    code = main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {path}") and EXPECTED[name] in err, err


def test_duplicates_are_counted_and_the_rest_is_used(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    path = CORPUS / "duplicates_only_one_kept.jsonl"
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "records: 2" in out and "examples: train 1" in out
    assert f"duplicate (exact): 1 (first: {path}:2)" in out
    assert (tmp_path / "lengths.png").read_bytes()[:4] == b"\x89PNG"
