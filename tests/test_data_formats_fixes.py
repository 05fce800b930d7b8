"""Records the formats misread (testers' walk-throughs 2 and 3): KTO labels as a CSV writes them,
numbers in an instruction's input, swapped columns, a `text` column beside other text, and a
record's own system prompt. Each is read as meant or refused with its line and reason."""
from __future__ import annotations

import pytest

from helpers import write_jsonl
from tunesmith.config import DataConfig
from tunesmith.data.prepare import prepare
from tunesmith.errors import UserError


def problems(prepared) -> dict[int, tuple[str, str]]:
    return {p.line: (p.kind, p.reason) for p in prepared.problems}


KTO_CSV = """prompt,completion,label
Where is my order?,It left yesterday.,true
Where is my order?,Dunno.,false
Hours?,9 to 5,True
Hours?,Whenever,FALSE
Refund?,Yes,1
Refund?,No,0
Size?,Large,yes
Size?,Whatever,No
"""


def test_kto_labels_as_text_are_kto_data_and_refused_as_sft(tmp_path, tiny_tokenizer):
    """A KTO file in CSV (labels the text `true`, `0`, ...) was read as prompt/completion SFT data,
    its thumbs-down answers imitated; read for KTO it was refused ("must be true or false, got
    'true'"). In JSON Lines a label "true" or null made the record SFT data too."""
    from tunesmith.data.check import data_kind
    from tunesmith.data.preference import UNPAIRED, prepare_preference

    csv = tmp_path / "kto.csv"
    csv.write_text(KTO_CSV)
    assert data_kind(DataConfig(train=str(csv))) == UNPAIRED
    kto = prepare_preference(DataConfig(train=str(csv), validation=str(csv)), tiny_tokenizer, UNPAIRED)
    assert kto.problems == []
    assert [e.desirable for e in kto.splits["train"].encoded] == [True, False] * 4
    with pytest.raises(UserError, match=r"kto.csv:2: KTO record: .*train.objective: kto"):
        prepare(DataConfig(train=str(csv), cache=False), tiny_tokenizer)

    rows = [{"question": f"What is item {i}?", "answer": f"It is thing {i}."} for i in range(4)] + [
        {"prompt": "Hours?", "completion": "9 to 5", "label": "true"},
        {"prompt": "Hours?", "completion": "Whenever", "label": None},
        {"prompt": "Hours?", "completion": "Never", "label": "maybe"},
        {"prompt": "Hours?", "completion": "At noon", "label": 1},
        {"prompt": "Hours?", "completion": "Sometimes", "label": 0.0},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    sft = prepare(DataConfig(train=str(path), validation=str(path), cache=False), tiny_tokenizer)
    assert {line: kind for line, (kind, _) in problems(sft).items()} == {line: "KTO record" for line in (5, 6, 7, 8, 9)}
    assert len(sft.splits["train"]) == 4

    kto = prepare_preference(DataConfig(train=str(path), validation=str(path)), tiny_tokenizer, UNPAIRED)
    found = problems(kto)
    assert found[6] == ("no label", "no label: field 'label' is empty: a KTO record needs true (a desirable answer) "
                                    "or false")
    assert found[7] == ("wrong type", "wrong type: field 'label' must be true or false (or yes / no, 1 / 0), got 'maybe'")
    assert [(e.desirable, c[-1]["content"]) for e, c in zip(kto.splits["train"].encoded, kto.splits["train"].conversations)] \
        == [(True, "9 to 5"), (True, "At noon"), (False, "Sometimes")]


def test_an_instruction_input_that_is_a_number_is_its_text_and_nan_is_none(tmp_path, tiny_tokenizer):
    """An Alpaca `input` of 21 or 3.5 was refused ("must be text, got int"), an `input` of 0 vanished
    from the prompt (the record taught "Double the number" -> "0"), and NaN (pandas' empty cell)
    refused its record; every other field reads a number as its text and NaN as empty."""
    rows = [{"instruction": "Double the number", "input": value, "output": "twice that"}
            for value in (0, 21, 3.5, 4.0, float("nan"), "", None, " 7 ", [1])]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    prepared = prepare(DataConfig(train=str(path), validation=str(path), cache=False, dedup=False), tiny_tokenizer)
    assert problems(prepared) == {9: ("wrong type", "wrong type: field 'input' must be text, got list")}
    prompts = [c[0]["content"] for c in prepared.splits["train"].conversations]
    assert prompts == [f"Double the number\n\n{text}" for text in ("0", "21", "3.5", "4")] \
        + ["Double the number"] * 3 + ["Double the number\n\n 7 "]


def test_data_columns_can_swap_two_known_columns(tmp_path, tiny_tokenizer):
    """`columns={question: answer, answer: question}` on a sheet written the wrong way round refused
    every record ("missing field: 'question'"): the renames ran one after another on one record,
    the second taking the value the first had just put there."""
    path = tmp_path / "reversed.csv"
    path.write_text("question,answer,note\nParis.,What is the capital of France?,geo\n"
                    "Four.,How many legs has a dog?,zoo\n")
    columns = {"question": "answer", "answer": "question"}
    prepared = prepare(DataConfig(train=str(path), validation=str(path), cache=False, columns=columns), tiny_tokenizer)
    assert prepared.problems == []
    assert [[m["content"] for m in c] for c in prepared.splits["train"].conversations] == [
        ["What is the capital of France?", "Paris."], ["How many legs has a dog?", "Four."]]
    from tunesmith.data.formats import rename_columns

    assert rename_columns({"q": "Q?", "answer": "old", "a": "A."}, {"question": "q", "answer": "a"}) \
        == {"question": "Q?", "answer": "A."}  # a mapped column replaces a field of that name, as before


def test_a_text_column_beside_other_text_is_refused_with_the_override(tmp_path, tiny_tokenizer):
    """A `text,summary` sheet was read as raw pre-training text: the summaries were never read, the
    articles trained on joined with EOS, and `data check` said only `format: text`."""
    from tunesmith.data.formats import FormatError, detect_format

    sheet = tmp_path / "summaries.csv"
    sheet.write_text("text,summary\nThe meeting moved to Friday because the room was booked.,Meeting moved.\n"
                     "Sales rose 5% in March after the spring campaign.,Sales up 5%.\n")
    with pytest.raises(UserError, match=r"summaries.csv:2: text beside other columns: .* other text in 'summary'; "
                                        r"map the columns, e.g. data.columns=\{question: text, answer: summary\}, "
                                        r"or set data.format: text"):
        prepare(DataConfig(train=str(sheet), cache=False), tiny_tokenizer)
    mapped = prepare(DataConfig(train=str(sheet), validation=str(sheet), cache=False,
                                columns={"question": "text", "answer": "summary"}), tiny_tokenizer)
    assert [c[-1]["content"] for c in mapped.splits["train"].conversations] == ["Meeting moved.", "Sales up 5%."]
    assert prepare(DataConfig(train=str(sheet), format="text", cache=False), tiny_tokenizer).formats == {"text": 2}
    with pytest.raises(FormatError, match=r"data.columns=\{question: question, answer: text\}"):
        detect_format({"text": "Paris.", "question": "What is the capital of France?"})

    # raw documents with their metadata, numbers and empty cells stay raw text
    docs = [{"text": f"Document {i} about the PixelPad screen and its billing.", "id": f"doc-{i}",
             "url": f"https://example.com/{i}", "Title": "A page title", "meta": {"lang": "en"},
             "token_count": 12, "score": "0.93", "notes": " "} for i in range(6)]
    prepared = prepare(DataConfig(train=str(write_jsonl(tmp_path / "docs.jsonl", docs)), cache=False), tiny_tokenizer)
    assert prepared.problems == [] and prepared.formats == {"text": 6}
    table = tmp_path / "docs.csv"
    table.write_text("id,text,score,source\n" + "".join(f"{i},Document {i} about billing.,0.5,crawl\n" for i in range(6)))
    assert prepare(DataConfig(train=str(table), cache=False), tiny_tokenizer).formats == {"text": 6}


def test_a_records_own_system_prompt_is_its_system_turn(tmp_path, tiny_tokenizer):
    """A record-level `system` (LLaMA-Factory's sharegpt and alpaca) or `system_prompt` (OpenOrca,
    SlimOrca) was dropped without a word: "answer in German" trained as if never said, and the
    template's default system prompt used instead."""
    chat = [{"from": "human", "value": "Where is my parcel?"}, {"from": "gpt", "value": "It left this morning."}]
    rows = [
        {"conversations": chat, "system": "You are Acme's support bot."},
        {"instruction": "Translate to French", "input": "cat", "output": "chat", "System": "You translate."},
        {"system_prompt": "Answer in German.", "question": "What is 1+1?", "answer": "Zwei."},
        {"question": "What is 2+2?", "answer": "Four.", "system": "", "system_prompt": None},  # empty: none
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}], "system": "Be brief."},  # the same: one turn
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello!"}], "system": "Be long."},
        {"question": "What is 3+3?", "answer": "Six.", "system": "One.", "system_prompt": "Two."},
    ]
    path = write_jsonl(tmp_path / "system.jsonl", rows)
    prepared = prepare(DataConfig(train=str(path), validation=str(path), cache=False,
                                  system_prompt="The config's prompt."), tiny_tokenizer)
    assert problems(prepared) == {
        6: ("two system prompts", "two system prompts: field 'system' and a system turn in the conversation differ; "
                                  "keep one"),
        7: ("two system prompts", "two system prompts: fields 'system' and 'system_prompt' differ; keep one")}
    assert [[(m["role"], m["content"]) for m in c if m["role"] == "system"]
            for c in prepared.splits["train"].conversations] == [
        [("system", "You are Acme's support bot.")], [("system", "You translate.")], [("system", "Answer in German.")],
        [("system", "The config's prompt.")], [("system", "Be brief.")]]


def test_a_mapped_column_is_found_in_another_case_or_with_spaces_around(tmp_path, tiny_tokenizer):
    """A header 'Q ,A' with columns={question: Q, answer: A} was refused (missing field 'question'),
    while the known fields are found so; two columns that both match loosely are not guessed between."""
    from tunesmith.data.formats import rename_columns

    path = tmp_path / "sheet.csv"
    path.write_text("Q ,a\nWhat is two and two?,Four.\nName a colour.,Blue.\n")
    prepared = prepare(DataConfig(train=str(path), validation=str(path), cache=False,
                                  columns={"question": "Q", "answer": "A"}), tiny_tokenizer)
    assert prepared.problems == [] and prepared.splits["train"].conversations[0][1]["content"] == "Four."
    assert rename_columns({"q": "x", "Q ": "y", "A": "z"}, {"question": "q", "answer": "a"}) == {"question": "x",
                                                                                                  "Q ": "y", "answer": "z"}
    assert "question" not in rename_columns({"Q": "x", "q ": "y"}, {"question": "q"})  # which one?


def test_an_empty_system_turn_is_no_system_prompt(tmp_path, tiny_tokenizer):
    """ShareGPT exports often open with {"from": "system", "value": ""}: the whole record was dropped as 'empty text'."""
    turns = [{"from": "system", "value": ""}, {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"conversations": turns},
                                                  {"conversations": [{"from": "system", "value": None}, *turns[1:]]}])
    held = write_jsonl(tmp_path / "held.jsonl", [{"question": "Bye?", "answer": "Bye."}])
    prepared = prepare(DataConfig(train=str(path), validation=str(held), dedup=False, cache=False), tiny_tokenizer)
    assert prepared.problems == []
    assert prepared.splits["train"].conversations == [[{"role": "user", "content": "Hi?"},
                                                        {"role": "assistant", "content": "Hello."}]] * 2
