"""The bad-input corpus (tests/bad_data): every malformed file gets its reason in one line, never a traceback."""
import json
from pathlib import Path

import pytest

from tunesmith.cli import main

CORPUS = Path(__file__).parent / "bad_data"
EXPECTED = {
    "broken_json.jsonl": ":1: broken JSON",
    "not_an_object.jsonl": ":1:2: not a JSON object",
    "missing_completion.jsonl": ":1: missing field: 'completion'",
    "prompt_not_text.jsonl": ":1: wrong type: field 'prompt' must be text, got dict",
    "empty_prompt.jsonl": ":1: empty text: field 'prompt' is empty",
    "unknown_role.jsonl": ":1: unknown role: 'wizard'",
    "no_assistant_turn.jsonl": ":1: no assistant turn",
    "messages_not_a_list.jsonl": ":1: wrong type: 'messages' must be a list, got str",
    "empty_messages.jsonl": ":1: empty text: 'messages' is an empty list",
    "turn_without_content.jsonl": ":1: missing field: messages[0].content is missing",
    "null_content.jsonl": ":1: empty text: messages[0].content is null",
    "pair_null_chosen.jsonl": ":1: empty text: field 'chosen' is null",
    "kto_null_prompt.jsonl": ":1: empty text: field 'prompt' is null",
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


def test_unknown_columns_get_the_override_to_paste_and_it_works(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A spreadsheet's own headers: the error names the override with them, and that override reads the file."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "faq.csv"
    # an id column first: the override named it as the question ({question: id, answer: Q})
    path.write_text("id,Q,A,source\n1,Where is my order?,It left yesterday.,web\n2,Can I pay later?,Yes.,mail\n")
    args = ["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    suggested = err.split("(e.g. ", 1)[1].split(")", 1)[0]
    assert suggested == "data.columns={question: Q, answer: A}"
    assert main([*args, suggested]) == 0
    assert "format: question_answer 2" in capsys.readouterr().out


def test_every_example_too_long_gets_the_length_hint_in_its_error(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """max_seq_len=32 dropped every example: the error said so without the hint `data check` prints when
    only some are lost, the one line that says what to set."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    rows = [{"question": f"Question {i}: " + "why is the sky blue and the sea green " * 3, "answer": "Light. " * 5}
            for i in range(12)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path),
                 "data.max_seq_len=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "every training example was dropped (longer than max_seq_len: 12)" in err
    assert "; hint: 100% of the examples (12 of 12) are lost to max_seq_len 32; max_seq_len=" in err, err


def test_a_column_mapping_with_a_misspelt_header_names_both(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """data.columns={answer: Answer} on a file whose header says Answr: the error said only "missing
    field: 'answer'", not which mapped column is absent nor what the file has."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "faq.csv"
    path.write_text("Q,Answr\nWhere is my order?,It left yesterday.\n")
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path),
                 "data.columns={question: Q, answer: Answer}"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: missing field: 'answer'" in err
    assert "data.columns names answer: 'Answer', not a column of this record (it has: Q, Answr)" in err, err


def test_duplicates_are_counted_and_the_rest_is_used(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    path = CORPUS / "duplicates_only_one_kept.jsonl"
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "records: 2" in out and "examples: train 1" in out
    assert f"duplicate (exact): 1 (first: {path}:2)" in out
    assert (tmp_path / "lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_many_over_long_examples_get_a_hint(tiny_model_dir, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    """MedQuAD-like data: long answers, so the default max_seq_len drops many examples. Above a tenth
    dropped, `data check` says which max_seq_len keeps 95% of them and what overlong=truncate keeps;
    both numbers are checked against prepare() run with those settings."""
    import math
    import random

    from helpers import write_jsonl
    from tunesmith.config import DataConfig
    from tunesmith.data.prepare import prepare

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    words = ["billing", "outage", "refund", "login", "priority", "urgent", "account", "invoice"]
    rows = [{"prompt": f"Question {i}: " + " ".join(rng.choices(words, k=rng.randint(2, 30))),
             "completion": " ".join(rng.choices(words, k=rng.choice([rng.randint(3, 20), rng.randint(40, 160)])))}
            for i in range(60)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    limit = 64

    def kept(**settings) -> int:
        prepared = prepare(DataConfig(**{"train": str(data), "max_seq_len": limit, "cache": False, **settings}),
                           tiny_tokenizer)
        return sum(len(s) for s in prepared.splits.values())

    everything = kept(max_seq_len=4096)
    assert main(["data", "check", str(data), f"max_seq_len={limit}", "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    hint = json.loads((tmp_path / "c" / "report.json").read_text())["length_hint"]
    dropped = everything - kept()
    assert dropped > everything / 10 and hint["lost"] == dropped and hint["examples"] == everything
    suggested = hint["suggested_max_seq_len"]
    assert kept(max_seq_len=suggested) >= math.ceil(0.95 * everything) > kept(max_seq_len=suggested - 64)
    assert hint["truncate_keeps"] == kept(overlong="truncate") - kept() > 0
    assert (f"max_seq_len={suggested} keeps" in out and f"overlong=truncate would keep {hint['truncate_keeps']} "
            f"of the {dropped}" in out), out
    # `train` prints the same hint with its data summary.
    config = {"model": {"name": str(tiny_model_dir), "dtype": "float32"}, "data": {"train": str(data), "max_seq_len": limit},
              "train": {"max_steps": 1, "batch_size": 2}, "eval": {"generate": False, "report": False},
              "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "run.json").write_text(json.dumps(config))
    assert main(["train", str(tmp_path / "run.json")]) == 0
    assert f"max_seq_len={suggested} keeps" in capsys.readouterr().err
    # Few dropped: no hint.
    assert main(["data", "check", str(data), f"max_seq_len={suggested}", "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "d")]) == 0
    assert "hint:" not in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_latin1_file_is_refused_at_its_line_with_the_conversion(suffix, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The first non-UTF-8 byte is named by line and file offset, far past the reader's first chunk
    (the decoder's own offset counts within a chunk), with the command that converts the file."""
    import shutil
    import subprocess

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    good = [json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) if suffix == ".jsonl"
            else f"question {i},answer {i}" for i in range(5000)]
    bad = json.dumps({"prompt": "café?", "completion": "oui"}, ensure_ascii=False) if suffix == ".jsonl" else "café?,oui"
    header = [] if suffix == ".jsonl" else ["prompt,completion"]
    text = "\n".join(header + good + [bad]) + "\n"
    path = tmp_path / f"latin{suffix}"
    path.write_bytes(text.encode("latin-1"))
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    line = len(header) + 5001
    offset = text.encode("latin-1").index("é".encode("latin-1"))
    assert err.startswith(f"error: {path}:{line}: not UTF-8 text (byte {offset} of the file is 0xe9)"), err
    if shutil.which("iconv"):  # the conversion it suggests reads
        command = err.split("utf-8 ", 1)[1].split(" > ")
        converted = tmp_path / command[1]
        converted.write_bytes(subprocess.run(["iconv", "-f", "cp1252", "-t", "utf-8", str(path)],
                                             capture_output=True, check=True).stdout)
        assert main(["data", "check", str(converted), "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 0


def test_a_spreadsheet_is_refused_with_how_to_save_it(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "tickets.xlsx"
    path.write_bytes(b"PK\x03\x04")  # a zip, as .xlsx files are
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 2
    assert 'save a spreadsheet as "CSV UTF-8"' in capsys.readouterr().err


def test_a_misspelt_field_suggests_the_column_to_map(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A file whose header says 'anwser' was refused with "missing field: 'answer'" and no word on the
    column that was meant; only a file with no known field got an override to paste."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "faq.jsonl"
    path.write_text('{"question": "Where is my order?", "anwser": "It left yesterday.", "id": 7}\n')
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (f"{path}:1: missing field: 'answer' (the record looks like format question_answer); did you mean "
            "column 'anwser'? map it with data.columns={answer: anwser}") in err, err
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path),
                 "data.columns={answer: anwser}"]) == 0
    capsys.readouterr()
    path.write_text('{"question": "Where is my order?", "reply": "It left yesterday."}\n')
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 2
    assert "did you mean" not in capsys.readouterr().err  # no column near 'answer': no guess


def test_each_kind_of_dropped_record_shows_its_first_reason(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`data check` printed 'unknown role: 2 (first: ...)' and 'broken JSON: 1' without the reason:
    not which role was misspelt, nor that line 1 was a comment; each kind now shows its first one whole."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    rows = [json.dumps({"messages": [turn("user", f"Question {i}?"), turn("assistant", f"Answer {i}.")]}) for i in range(6)]
    rows += [json.dumps({"messages": [turn("user", "Hi?"), turn("asistant", "Hello.")]})]
    path = tmp_path / "chat.jsonl"
    path.write_text("# exported 2026-12-01\n" + "\n".join(rows) + "\n\n")
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"  unknown role: 1 (first: {path}:8)\n    e.g. {path}:8: unknown role: 'asistant' in messages[1]" in out, out
    assert f"    e.g. {path}:1: broken JSON" in out and "dropped:\n" in out


def test_every_record_dropped_names_the_first_reason(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Tool calls with a template that drops them: the error said 'template refused: 2' and not why."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "get_time", "arguments": {}}}
    rows = [{"tools": tools, "messages": [{"role": "user", "content": f"Time {i}?"},
                                          {"role": "assistant", "content": "", "tool_calls": [call]}]} for i in range(2)]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(template refused: 2)" in err
    assert f"; first: {path}:1: template: the chat template does not render tool calls" in err, err


def test_a_conversation_ending_after_its_last_answer_is_refused_and_role_case_is_read(tiny_model_dir, tmp_path, capsys,
                                                                                       monkeypatch):
    """A chat record ending with a user turn trained silently (a cut-off conversation), and as a test
    record was scored against that user turn as the reference; 'Assistant' was an unknown role though
    column names are read in any case."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    rows = [{"messages": [turn("User", f"Question {i}?"), turn("Assistant", f"Answer {i}.")]} for i in range(4)]
    rows.append({"messages": [turn("user", "Hi?"), turn("assistant", "Hello."), turn("user", "And then?")]})
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "records: 5" in out and "unknown role" not in out
    assert (f"e.g. {path}:5: unanswered last turn: the conversation ends with a user turn after its last answer "
            "(remove that turn, or add its answer)") in out, out


def test_a_file_with_no_usable_record_names_its_commonest_problems_first(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A chat file given as pairs said 'First problem: chat.jsonl:3: broken JSON' (reading problems came
    first); the four lines without a chosen answer, the reason, went unsaid."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    rows = [json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]})
            for i in range(4)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(rows[:2] + ['{"messages": [oops'] + rows[2:]) + "\n")
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--objective", "dpo",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"no usable pairs examples (5 problems): {path}:1: " in err and "(4 like it); " in err, err
    assert err.index("(4 like it)") < err.index(f"{path}:3: broken JSON"), err
