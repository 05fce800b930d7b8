"""User data files: every source type and format becomes chat messages; bad lines are reported with file, line, reason."""
import csv
import json

import pytest

from tunesmith.config import DataConfig
from tunesmith.data.prepare import prepare
from tunesmith.errors import UserError

from helpers import CHATML, write_jsonl

EXPECTED = [("2+2?", "4"), ("Capital of France?", "Paris"), ("Translate to French\n\ncat", "chat"), ("Say hi", "hi"),
            ("Color of the sky?", "blue")]


def good(n: int = 0) -> list[dict]:
    """One record of each format; `n` makes the texts distinct (duplicates would be removed)."""
    s = f" #{n}" if n else ""
    return [
        {"messages": [{"role": "user", "content": "2+2?" + s}, {"role": "assistant", "content": "4" + s}]},
        {"conversations": [{"from": "human", "value": "Capital of France?" + s}, {"from": "gpt", "value": "Paris" + s}]},
        {"instruction": "Translate to French", "input": "cat" + s, "output": "chat" + s},
        {"prompt": "Say hi" + s, "completion": "hi" + s},
        {"question": "Color of the sky?" + s, "answer": "blue" + s},
    ]


def all_examples(prepared):
    return [c for name in ("train", "validation") for c in prepared.splits[name].conversations]


def test_each_format_is_read(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [r for n in range(4) for r in good(n)])
    prepared = prepare(DataConfig(train=str(path), cache=False), tiny_tokenizer)
    assert len(all_examples(prepared)) == 20 and not prepared.problems
    assert dict(prepared.formats) == {"messages": 4, "sharegpt": 4, "instruction": 4, "prompt_completion": 4,
                                      "question_answer": 4}
    pairs = {(c[0]["content"], c[1]["content"]) for c in all_examples(prepared)}
    assert set(EXPECTED) <= pairs
    assert all(e.label_count > 0 for e in prepared.splits["train"].encoded)


def test_json_csv_parquet_and_saved_dataset_give_the_same_examples(tmp_path, tiny_tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(12)]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=1))
    with open(tmp_path / "d.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, ["question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    seen = []
    for source in ("d.json", "d.csv", "d.parquet", "saved"):
        prepared = prepare(DataConfig(train=str(tmp_path / source), cache=False), tiny_tokenizer)
        seen.append(sorted(c[1]["content"] for c in all_examples(prepared)))
    assert all(s == [r["answer"] for r in sorted(rows, key=lambda r: r["answer"])] for s in seen)


def test_a_saved_data_set_from_elsewhere_opens_no_media_and_a_damaged_one_is_one_line(tmp_path, tiny_tokenizer):
    """Decoding an image column opened whatever path (or address) a row named; a damaged
    dataset_info.json was a KeyError traceback."""
    import datasets

    picture = {"path": str(tmp_path / "elsewhere.png"), "bytes": None}
    rows = {"question": ["Q1?", "Q2?"], "answer": ["A1.", "A2."], "picture": [picture] * 2,
            "album": [[picture]] * 2, "meta": [{"cover": picture}] * 2}
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "picture": datasets.Image(), "album": datasets.List(datasets.Image()),
                                  "meta": {"cover": datasets.Image()}})
    (tmp_path / "elsewhere.png").write_text("not the data set's to open")
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "elsewhere.png").unlink()  # opening it now would fail
    prepared = prepare(DataConfig(train=str(tmp_path / "saved"), cache=False), tiny_tokenizer)
    assert sorted(c[1]["content"] for c in all_examples(prepared)) == ["A1.", "A2."]
    (tmp_path / "saved" / "dataset_info.json").write_text("{not json")
    (tmp_path / "saved" / "state.json").write_text("{}")
    with pytest.raises(UserError, match="saved: not a readable saved data set"):
        prepare(DataConfig(train=str(tmp_path / "saved"), cache=False), tiny_tokenizer)


def test_a_json_lists_records_are_named_by_the_line_they_start_on(tmp_path):
    """Pretty-printed lists, and one in a {"data": [...]} wrapper: each problem at its record's line."""
    from tunesmith.data.sources import read_records

    (tmp_path / "list.json").write_text('[\n {"question": "Q?",\n  "answer": "A."},\n\n 5,\n ["x"]\n]\n')
    (tmp_path / "wrapped.json").write_text('{"version": 1,\n "data": [\n  {"question": "Q?", "answer": "A."},\n  7\n ]}')
    found = read_records(tmp_path / "list.json")
    assert [line for _, line, _ in found.rows] == [2]
    assert [(p.line, p.reason.split(" (")[0]) for p in found.problems] == [(5, "not a JSON object"), (6, "not a JSON object")]
    assert [p.line for p in read_records(tmp_path / "wrapped.json").problems] == [4]


def test_folder_of_files_and_column_mapping(tmp_path, tiny_tokenizer):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"Q": f"q{i}", "A": f"a{i}"} for i in range(5)])
    write_jsonl(folder / "b.jsonl", [{"Q": f"r{i}", "A": f"b{i}"} for i in range(5)])
    (folder / "README.md").write_text("not data")
    cfg = DataConfig(train=str(folder), columns={"question": "Q", "answer": "A"}, cache=False)
    prepared = prepare(cfg, tiny_tokenizer)
    assert len(all_examples(prepared)) == 10 and prepared.formats == {"question_answer": 10}
    assert {o[0] for o in prepared.splits["train"].origins} == {str(folder / "a.jsonl"), str(folder / "b.jsonl")}


def test_fields_in_their_common_spellings(tmp_path, tiny_tokenizer):
    """Spreadsheet headers in any case with stray spaces, Dolly's instruction / context / response
    and prompt / response are read without a column mapping; an exact field wins over a variant."""
    with open(tmp_path / "sheet.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["Question", " ANSWER ", "Source"])
        writer.writerows([[f"Q{i}?", f"A{i}.", "web"] for i in range(4)])
    write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": f"Sum up #{i}", "context": f"text {i}", "response": f"r{i}",
                                            "category": "summarization"} for i in range(4)]
                + [{"Prompt": f"P{i}", "Response": f"C{i}"} for i in range(4)]
                + [{"question": f"exact {i}", "Question": f"variant {i}", "answer": f"a{i}"} for i in range(4)])
    prepared = prepare(DataConfig(train=str(tmp_path / "sheet.csv"), cache=False), tiny_tokenizer)
    assert prepared.formats == {"question_answer": 4} and not prepared.problems
    assert sorted((c[0]["content"], c[1]["content"]) for c in all_examples(prepared)) == \
        [(f"Q{i}?", f"A{i}.") for i in range(4)]
    prepared = prepare(DataConfig(train=str(tmp_path / "dolly.jsonl"), cache=False), tiny_tokenizer)
    assert prepared.formats == {"instruction": 4, "prompt_completion": 4, "question_answer": 4}
    pairs = {(c[0]["content"], c[1]["content"]) for c in all_examples(prepared)}
    assert {("Sum up #1\n\ntext 1", "r1"), ("P2", "C2"), ("exact 3", "a3")} <= pairs
    assert not any(user.startswith("variant") for user, _ in pairs)


def test_a_byte_order_mark_is_not_data(tmp_path, tiny_tokenizer):
    """Excel's "CSV UTF-8" and Windows editors start a file with a byte-order mark: it made the first
    CSV header 'question' unknown (every row failed) and the first JSONL line broken JSON."""
    rows = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(6)]
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8-sig") as out:
        writer = csv.DictWriter(out, ["question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8-sig")
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8-sig")
    for name in ("d.csv", "d.jsonl", "d.json"):
        prepared = prepare(DataConfig(train=str(tmp_path / name), cache=False, dedup=False), tiny_tokenizer)
        assert not prepared.problems and prepared.formats == {"question_answer": 6}, name


def test_semicolon_csv_and_tsv(tmp_path, tiny_tokenizer):
    """A spreadsheet saved in a locale with decimal commas writes semicolons; .tsv files use tabs.
    A comma inside a cell of a semicolon file stays text."""
    (tmp_path / "semi.csv").write_text('question;answer\n"Dose, adult?";"2,5 mg"\nWhy;Because, mostly\n')
    (tmp_path / "d.tsv").write_text("question\tanswer\nDose, adult?\t2,5 mg\nWhy\tBecause, mostly\n")
    for name in ("semi.csv", "d.tsv"):
        prepared = prepare(DataConfig(train=str(tmp_path / name), cache=False, validation_share=0.5), tiny_tokenizer)
        assert not prepared.problems, name
        assert sorted((c[0]["content"], c[1]["content"]) for c in all_examples(prepared)) == \
            [("Dose, adult?", "2,5 mg"), ("Why", "Because, mostly")], name


def test_a_bare_list_of_messages_is_a_conversation(tmp_path, tiny_tokenizer):
    chats = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}] for i in range(4)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n[1, 2]\n")
    (tmp_path / "d.json").write_text(json.dumps(chats))
    for name, problems in (("d.jsonl", [(5, "not a JSON object (got list)")]), ("d.json", [])):
        prepared = prepare(DataConfig(train=str(tmp_path / name), cache=False), tiny_tokenizer)
        assert prepared.formats == {"messages": 4}, name
        assert [(p.line, p.reason) for p in prepared.problems] == problems, name


def test_sharegpt_with_role_and_content_turns(tmp_path, tiny_tokenizer):
    """lmsys-chat style: `conversation` (or `conversations`) holding role / content turns."""
    turns = lambda i: [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]  # noqa: E731
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversation": turns(i)} for i in range(3)]
                       + [{"conversations": turns(i)} for i in range(3, 6)])
    prepared = prepare(DataConfig(train=str(path), cache=False), tiny_tokenizer)
    assert prepared.formats == {"sharegpt": 6} and not prepared.problems
    assert ("hi 4", "hello 4") in {(c[0]["content"], c[1]["content"]) for c in all_examples(prepared)}


def test_a_response_does_not_replace_an_answer_field():
    from tunesmith.data.formats import canonical_fields
    from tunesmith.data.formats import UNPAIRED, record_kind

    assert canonical_fields({"prompt": "p", "completion": "c", "response": "r"}) == \
        {"prompt": "p", "completion": "c", "response": "r"}
    assert canonical_fields({"Text": "doc", 3: "x"}) == {"text": "doc", 3: "x"}
    assert record_kind(canonical_fields({"Prompt": "p", "Response": "r", "Label": True})) == UNPAIRED


def test_mix_weights_repeat_and_subsample(tmp_path, tiny_tokenizer):
    main = write_jsonl(tmp_path / "main.jsonl", [{"prompt": f"m{i}", "completion": f"x{i}"} for i in range(40)])
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"prompt": f"e{i}", "completion": f"y{i}"} for i in range(40)])
    held = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "v", "completion": "w"}])
    cfg = DataConfig(train=str(main), validation=str(held), mix={str(extra): 2.0}, cache=False)
    train = prepare(cfg, tiny_tokenizer).splits["train"]
    from_extra = [o for o in train.origins if o[0] == str(extra)]
    assert len(from_extra) == 80 and len(set(from_extra)) == 40
    # Weight 0.2: each kept with probability 0.2, about 8 of 40 (binomial sd 2.5); 1 - 0.2 would keep about 32
    fifth = prepare(cfg.model_copy(update={"mix": {str(extra): 0.2}}), tiny_tokenizer).splits["train"]
    kept = sum(o[0] == str(extra) for o in fifth.origins)
    assert 2 <= kept <= 16 and len(fifth) - kept == 40


def test_duplicates_across_train_and_a_mixed_source_are_removed_before_the_split(tmp_path, tiny_tokenizer):
    """A mixed source repeating the training file: its copies are duplicates (else the held-out
    validation examples would be in train too, reported as no overlap)."""
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    main, extra = write_jsonl(tmp_path / "main.jsonl", rows), write_jsonl(tmp_path / "extra.jsonl", rows)
    prepared = prepare(DataConfig(train=str(main), mix={str(extra): 1.0}, cache=False), tiny_tokenizer)
    train, validation = prepared.splits["train"], prepared.splits["validation"]
    assert len(train) + len(validation) == 20 and prepared.dropped == {"duplicate (exact)": 20}
    assert not {str(c) for c in train.conversations} & {str(c) for c in validation.conversations}


def test_format_override_and_raw_text_chunks(tmp_path, tiny_tokenizer):
    docs = [{"text": "Billing question number %d about the PixelPad screen." % i, "prompt": "p", "completion": "c"}
            for i in range(30)]
    path = write_jsonl(tmp_path / "t.jsonl", docs)
    cfg = DataConfig(train=str(path), format="text", max_seq_len=32, validation_share=0.2, cache=False)
    prepared = prepare(cfg, tiny_tokenizer)
    rows = prepared.splits["train"].encoded
    assert prepared.formats == {"text": 30}
    assert all(len(r.input_ids) <= 32 and r.labels == r.input_ids for r in rows)
    assert sum(len(r.input_ids) for r in rows[:-1]) == 32 * (len(rows) - 1)  # full rows but the last
    stream = [t for r in rows for t in r.input_ids]
    assert stream.count(tiny_tokenizer.eos_token_id) == 24  # one EOS after each training document


def test_bad_lines_are_reported_and_skipped(tmp_path, tiny_tokenizer):
    rows = good() + ['{"messages": [', '[1, 2]', {"prompt": "", "completion": "x"},
                     {"messages": [{"role": "robot", "content": "x"}]}, {"text_only": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare(DataConfig(train=str(path), cache=False), tiny_tokenizer)
    found = {p.line: p.reason for p in prepared.problems}
    assert set(found) == {6, 7, 8, 9, 10}
    assert "broken JSON" in found[6] and "not a JSON object" in found[7]
    assert "'prompt' is empty" in found[8] and "unknown role" in found[9] and "'robot'" in found[9]
    assert all(str(p).startswith(f"{path}:") for p in prepared.problems)
    assert prepared.dropped == {"broken JSON": 1, "not a JSON object": 1, "empty text": 1, "unknown role": 1,
                                "unknown format": 1}


def test_no_valid_example_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"oops"', {"prompt": ["x"], "completion": "x"}])
    with pytest.raises(UserError, match="no usable training examples"):
        prepare(DataConfig(train=str(path)), tiny_tokenizer)


def test_too_few_valid_records_stop_the_run(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", good() + ['{"broken'] * 5)
    assert prepare(DataConfig(train=str(path), min_valid_share=0.4, cache=False), tiny_tokenizer)
    with pytest.raises(UserError, match="only 5 of 10 training records are usable"):
        prepare(DataConfig(train=str(path), min_valid_share=0.6, cache=False), tiny_tokenizer)
    # Broken lines of a validation file are not training records
    val = write_jsonl(tmp_path / "v.jsonl", good(1) + ['{"broken'] * 20)
    prepared = prepare(DataConfig(train=str(path), validation=str(val), min_valid_share=0.4, cache=False), tiny_tokenizer)
    assert prepared.records == 10 and len(prepared.splits["validation"]) == 5


def test_duplicates_removed_and_overlap_reported(tmp_path, tiny_tokenizer):
    rows = good() + [good()[0], {"question": "COLOR of the sky", "answer": "Blue!"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "say HI", "completion": "hi"}, {"prompt": "new", "completion": "n"}])
    prepared = prepare(DataConfig(train=str(train), validation=str(val), cache=False), tiny_tokenizer)
    assert prepared.dropped == {"duplicate (exact)": 1, "duplicate (normalised text)": 1}
    assert [p.line for p in prepared.problems] == [6, 7]
    assert "of " + str(train) + ":1" in prepared.problems[0].reason
    assert prepared.overlap["validation"] == [f"{val}:1"]
    assert len(prepared.splits["train"]) == 5


def test_answers_that_differ_only_in_their_tool_calls_are_not_duplicates():
    """An assistant turn that only calls a tool has empty content: two such records asking the same
    with different arguments are two examples (the calls are part of the text compared), while a
    record repeating one of them, arguments and all, is a duplicate."""
    from tunesmith.data.validate import deduplicate

    def calling(city):
        return [{"role": "user", "content": "Weather there?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": city}}}]}]

    keep, problems, counts = deduplicate([calling("Paris"), calling("Oslo"), calling("Paris")],
                                         [("d.jsonl", 1), ("d.jsonl", 2), ("d.jsonl", 3)])
    assert keep == [0, 1] and counts == {"duplicate (exact)": 1}
    assert [(p.line, p.reason) for p in problems] == [(3, "duplicate (exact) of d.jsonl:1")]


def test_seeded_validation_split_is_reproducible_and_disjoint(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)])
    first = prepare(DataConfig(train=str(path), seed=3, cache=False), tiny_tokenizer)
    again = prepare(DataConfig(train=str(path), seed=3, cache=False), tiny_tokenizer)
    other = prepare(DataConfig(train=str(path), seed=4, cache=False), tiny_tokenizer)
    val = first.splits["validation"].origins
    assert len(val) == 5 and val == again.splits["validation"].origins != other.splits["validation"].origins
    assert not set(val) & set(first.splits["train"].origins)


def test_hidden_files_of_a_folder_are_not_data_and_a_long_csv_cell_is(tmp_path, tiny_tokenizer):
    """macOS's ._train.jsonl beside train.jsonl is no data file (it is not UTF-8, and was refused as one);
    a CSV cell may hold a whole document, past the csv module's 128 KiB limit."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", good())
    (folder / "._train.jsonl").write_bytes(b"\x00\x05\x16\x07\xff binary resource fork")
    assert len(all_examples(prepare(DataConfig(train=str(folder), cache=False), tiny_tokenizer))) == 5
    path = tmp_path / "long.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["prompt", "completion"], ["Summarise", "word " * 40_000], ["Say hi", "hi"]])
    prepared = prepare(DataConfig(train=str(path), max_seq_len=64, cache=False), tiny_tokenizer)
    assert prepared.dropped == {"longer than max_seq_len": 1} and len(all_examples(prepared)) == 1


def test_missing_file_is_a_user_error(tiny_tokenizer):
    with pytest.raises(UserError, match="data file not found"):
        prepare(DataConfig(train="/no/such/file.jsonl"), tiny_tokenizer)


def test_a_missing_relative_path_names_the_folder_it_was_looked_for_in(tmp_path, monkeypatch):
    """A resume run from another folder than training's: the relative path is read from here."""
    from tunesmith.data.sources import check_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"read from the current folder, {tmp_path}"):
        check_source("train.jsonl", "data.train")
    with pytest.raises(UserError, match=r"^/no/such.jsonl: data file not found \(data.train\)$"):
        check_source("/no/such.jsonl", "data.train")


def test_second_prepare_comes_from_the_cache(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "d.jsonl", [r for n in range(3) for r in good(n)] + ['{"broken'])
    first = prepare(DataConfig(train=str(path)), tiny_tokenizer)
    second = prepare(DataConfig(train=str(path)), str(tiny_tokenizer.name_or_path))  # not even loaded
    assert not first.cached and second.cached
    for name in ("train", "validation"):
        a, b = first.splits[name], second.splits[name]
        assert [(e.input_ids, e.labels) for e in a.encoded] == [(e.input_ids, e.labels) for e in b.encoded]
        assert a.conversations == b.conversations and a.origins == b.origins
    assert [str(p) for p in first.problems] == [str(p) for p in second.problems]
    # Another setting, or changed data, is another cache entry.
    assert not prepare(DataConfig(train=str(path), train_on_inputs=True), tiny_tokenizer).cached
    with open(path, "a") as out:
        out.write(json.dumps({"prompt": "new", "completion": "one"}) + "\n")
    changed = prepare(DataConfig(train=str(path)), tiny_tokenizer)
    fresh = prepare(DataConfig(train=str(path), cache=False), tiny_tokenizer)
    assert not changed.cached and changed.records == first.records + 1
    for name in ("train", "validation"):  # the new record's tokens, not the old entry's
        assert ([(e.input_ids, e.labels) for e in changed.splits[name].encoded]
                == [(e.input_ids, e.labels) for e in fresh.splits[name].encoded])


def ids_of(prepared) -> list[list[int]]:
    return [e.input_ids for e in prepared.splits["train"].encoded]


def test_an_edited_chat_template_is_a_new_cache_entry(tmp_path, tiny_model_dir, monkeypatch):
    """The key holds the template's text and the tokenizer files' contents, not the template's path:
    editing the .jinja file named by data.chat_template, or the tokenizer's own chat_template.jinja
    (same size and mtime, as a checkout can leave it), gives the new template's tokens, not stale ones."""
    import os
    import shutil

    from tunesmith.models import load_tokenizer

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "d.jsonl", [r for n in range(3) for r in good(n)])
    template = tmp_path / "chat.jinja"
    template.write_text(CHATML)
    cfg = DataConfig(train=str(path), chat_template=str(template))
    first = prepare(cfg, load_tokenizer(str(tiny_model_dir)))
    assert not first.cached and prepare(cfg, load_tokenizer(str(tiny_model_dir))).cached
    template.write_text(CHATML.replace("<|im_start|>", "<|im_start|>\n"))  # the user edits the file
    edited = prepare(cfg, load_tokenizer(str(tiny_model_dir)))
    fresh = prepare(DataConfig(train=str(path), chat_template=str(template), cache=False), load_tokenizer(str(tiny_model_dir)))
    assert not edited.cached and ids_of(edited) == ids_of(fresh) != ids_of(first)
    by_spec = prepare(cfg, str(tiny_model_dir))  # `data check --model FOLDER`: the same entry, no tokenizer loaded
    assert by_spec.cached and ids_of(by_spec) == ids_of(fresh)

    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_model_dir, folder)
    own = DataConfig(train=str(path))
    before = prepare(own, str(folder))
    assert not before.cached and prepare(own, load_tokenizer(str(folder))).cached
    jinja = folder / "chat_template.jinja"
    stat = jinja.stat()
    jinja.write_text(jinja.read_text().replace("<|im_start|>", "<|im_begin|>"))  # same length
    os.utime(jinja, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert jinja.stat().st_size == stat.st_size
    after = prepare(own, load_tokenizer(str(folder)))
    assert not after.cached and ids_of(after) != ids_of(before)
    assert ids_of(after) == ids_of(prepare(DataConfig(train=str(path), cache=False), load_tokenizer(str(folder))))


def test_a_csv_record_is_reported_at_its_first_line(tmp_path, tiny_tokenizer):
    """A quoted cell over several lines (a spreadsheet answer with line breaks): the next records'
    problems were reported at the line where the record ended, not where it starts."""
    path = tmp_path / "sheet.csv"
    path.write_text('question,answer\n"Steps?","one\ntwo\nthree"\n\n"Empty\nanswer?",\n"x","y","z"\nWhy?,Because.\n')
    prepared = prepare(DataConfig(train=str(path), validation=str(path), cache=False), tiny_tokenizer)
    assert sorted({(p.line, p.reason[:5]) for p in prepared.problems}) == [(6, "empty"), (8, "malfo")]
    assert sorted({c[1]["content"] for c in all_examples(prepared)}) == ["Because.", "one\ntwo\nthree"]


def test_tools_declared_as_bare_function_objects_are_read_and_calls_checked_against_them():
    """A record's `tools` may list bare function objects ({name, parameters}) as well as
    {"type": "function", "function": {...}}: both reach the template in the second form."""
    from tunesmith.data.formats import to_example
    from tunesmith.data.tools import FormatError

    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}
    wrapped = {"type": "function", "function": {"name": "get_time", "parameters": {}}}

    def record(arguments):
        return {"tools": [weather, wrapped], "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                              "arguments": arguments}}]}]}

    _, messages = to_example(record('{"city": "Oslo"}'))
    assert messages[0]["tools"] == [{"type": "function", "function": weather}, wrapped]
    assert messages[-1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    with pytest.raises(FormatError, match="without 'city'"):
        to_example(record("{}"))


def test_answers_that_differ_only_in_their_reasoning_are_not_duplicates():
    """Two records with the same question and answer but other reasoning_content teach different
    reasoning: both stay; the same record twice is one."""
    from tunesmith.data.validate import deduplicate

    def record(reasoning):
        return [{"role": "user", "content": "Is 91 prime?"},
                {"role": "assistant", "content": "No.", "reasoning_content": reasoning}]

    conversations = [record("91 = 7 x 13."), record("It is odd, but 7 divides it."), record("91 = 7 x 13.")]
    keep, problems, counts = deduplicate(conversations, [("d.jsonl", n) for n in (1, 2, 3)])
    assert keep == [0, 1] and counts == {"duplicate (exact)": 1} and problems[0].line == 3


def test_a_validation_split_emptied_by_the_drops_is_said(tmp_path, tiny_tokenizer):
    """The validation share is held out before the length and template checks: where they dropped it
    all, the run trained without an eval loss, early stopping or best weights, and said only
    'validation 0' among the counts."""
    from tunesmith.data.check import data_lines
    from tunesmith.data.prepare import _hold_out

    cfg = DataConfig(train=str(tmp_path / "train.jsonl"), max_seq_len=64, validation_share=0.2)
    n = 5
    held = _hold_out((list(range(n)), list(range(n))), [1.0] * n, cfg)[1][0]  # the record(s) the seed holds out
    rows = [{"prompt": f"Question {i}?", "completion": ("word " * 200 if i in held else f"Answer {i}.")} for i in range(n)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    prepared = prepare(cfg, tiny_tokenizer)
    assert len(prepared.splits["train"]) == n - len(held) and not prepared.splits["validation"]
    lines = data_lines(prepared, cfg)
    assert ("warning: no validation example is left in the held-out share of train (data.validation_share) after "
            "the drops above: this run has no eval loss") in "\n".join(lines)
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(n)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    assert not any("warning" in line for line in data_lines(prepare(cfg, tiny_tokenizer), cfg))


def test_tool_call_arguments_are_checked_against_their_schema_types_and_enums():
    """Only the function's name and its required arguments were checked: a call passing a number as
    text, or a value outside the schema's enum, trained the model to make calls its tools reject."""
    from tunesmith.data.formats import to_example
    from tunesmith.data.tools import FormatError

    weather = {"name": "get_weather", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}

    def record(arguments, tool=weather):
        return {"tools": [tool], "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                              "arguments": arguments}}]}]}

    assert to_example(record({"city": "Oslo", "days": 3, "unit": "celsius"}))
    for arguments, reason in [({"city": "Oslo", "days": "3"}, r"arguments\['days'\]: '3' is not of type 'integer'"),
                              ({"city": "Oslo", "unit": "kelvin"}, r"arguments\['unit'\]: 'kelvin' is not one of"),
                              ({"city": "Oslo", "country": "NO"}, r"arguments: Additional properties .*'country'")]:
        with pytest.raises(FormatError, match=reason) as caught:
            to_example(record(arguments))
        assert caught.value.kind == "tool call: arguments unlike the schema"
    # A schema that is not JSON Schema ("int", as some data sets write) is not held against the call.
    sloppy = {"name": "get_weather", "parameters": {"type": "object", "properties": {"days": {"type": "int"}}}}
    assert to_example(record({"days": "3"}, sloppy))


def test_a_tool_schema_referring_elsewhere_is_not_fetched_nor_a_crash():
    """A `$ref` the schema does not hold (OpenAPI-derived tools) crashed data preparation with a
    referencing error, and one to a URL was fetched, without a timeout, for every call."""
    from unittest import mock

    from tunesmith.data.tools import argument_problem

    for ref in ("#/components/schemas/Unit", "http://127.0.0.1:9/unit.json"):
        schema = {"type": "object", "properties": {"unit": {"$ref": ref}, "days": {"type": "integer"}}}
        with mock.patch("urllib.request.urlopen", side_effect=AssertionError("fetched")):
            assert argument_problem({"unit": "kelvin"}, schema) is None
            assert argument_problem({"days": "3"}, schema) == "arguments['days']: '3' is not of type 'integer'"


def test_a_tool_schema_cannot_hang_or_crash_the_check():
    """A data file's schema is someone else's: `^(a+)+$` against 40 characters took hours (and the
    dashboard's preview held every request meanwhile); `{"$ref": "#"}` recursed into a traceback."""
    from tunesmith.data.tools import argument_problem

    evil = "a" * 40 + "!"
    patterned = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a+)+$"},
                                                  "n": {"type": "integer"}},
                 "propertyNames": {"pattern": "^(a+)+$"}}
    keyed = {"type": "object", "patternProperties": {"^(a+)+$": {"type": "string"}}, "additionalProperties": False}
    assert argument_problem({"a": evil}, patterned) is None  # (was: hours, exponential in the length)
    assert argument_problem({"a": evil, "n": "1"}, patterned) == "arguments['n']: '1' is not of type 'integer'"
    assert argument_problem({evil: "x"}, keyed) is None
    # patternProperties in one nested object leaves additionalProperties: false checked everywhere else.
    nested = {"type": "object", "additionalProperties": False,
              "properties": {"unit": {"type": "string"},
                             "tags": {"type": "object", "patternProperties": {"^(a+)+$": {"type": "string"}}}}}
    assert "Additional properties" in argument_problem({"unit": "c", "bogus": 1}, nested)
    assert argument_problem({"unit": "c", "tags": {evil: "x"}}, nested) is None
    for looping in ({"$ref": "#"}, {"$defs": {"x": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"}):
        assert argument_problem({"a": 1}, looping) is None


def test_the_lines_a_run_prints_say_how_many_skipped_records_they_leave_out(tmp_path, tiny_tokenizer):
    """Five skipped records are named; a sixth was counted in 'dropped' but never named or mentioned."""
    from tunesmith.data.check import data_lines

    cfg = DataConfig(train=str(write_jsonl(tmp_path / "d.jsonl", good() + ['{"broken'] * 6 + [{"prompt": "q"}])),
                     cache=False)
    lines = data_lines(prepare(cfg, tiny_tokenizer), cfg)
    assert sum(line.startswith("  skipped ") for line in lines) == 5
    assert "  and 2 more (tunesmith data check lists them by kind)" in lines


def test_a_run_on_the_built_in_demo_data_says_so(tiny_tokenizer):
    """An empty config trains on the demo (data.train's default) for minutes: its first line says whose data it is."""
    from tunesmith.data.check import data_lines

    cfg = DataConfig(demo_size=24, cache=False)
    assert data_lines(prepare(cfg, tiny_tokenizer), cfg)[0].endswith("(the built-in demo task; data.train names your own file)")


def test_data_check_of_a_run_config_reads_its_data_as_the_run_does(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`data check my.yaml` was 'unsupported data file type .yaml': its data settings had to be typed again."""
    from tunesmith.cli import main

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "mine.jsonl", [{"Q": f"question {i}", "A": f"answer {i}"} for i in range(6)])
    config = tmp_path / "my.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata:\n  train: {train}\n  columns: {{question: Q, answer: A}}\n"
                      "  max_seq_len: 48\n")
    assert main(["data", "check", str(config), "max_seq_len=40", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert f"data: {train}   tokenizer: {tiny_model_dir}" in printed and "question_answer 6" in printed
    assert "(max_seq_len 40)" in printed  # the command line's setting on top of the config's
