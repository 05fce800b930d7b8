"""Messy real-world data files (a reviewer's collection): stray quotes, Excel's CSV habits, files joined
with cat, JSON saved under the other suffix, folders of splits, compressed files, mistyped paths.
Each is read as its author meant, or refused in one line naming file, line and what to do."""
import csv
import gzip
import json
import re

import pytest

from tunesmith.config import DataConfig
from tunesmith.data.prepare import prepare
from tunesmith.data.near_dup import report
from tunesmith.data.sources import check_source, read_records, source_files
from tunesmith.data.validate import drop_report
from tunesmith.errors import UserError

from helpers import write_jsonl


def rows_of(path, **options):
    """(line, record) of each row read, and (line, reason) of each problem."""
    found = read_records(path, **options)
    return [(line, row) for _, line, row in found.rows], [(p.line, p.reason) for p in found.problems]


def qa(question, answer):
    return {"question": question, "answer": answer}


# CSV and TSV quoting

def test_an_unclosed_quote_is_refused_at_the_line_it_opens(tmp_path):
    """The reviewer's file: row 102's answer opens a quote it never closes; csv read the rest of the
    file into that one cell (101 records, then one 'longer than max_seq_len')."""
    lines = ["question,answer"] + [f"What is item {n}?,It is thing number {n}" for n in range(1, 301)]
    lines[101] = 'What is a 12" ruler?,"A ruler that is 12 inches long'  # file line 102
    path = tmp_path / "items.csv"
    path.write_text("\n".join(lines) + "\n")
    where = re.escape(str(path))
    with pytest.raises(UserError, match=rf"^{where}:102: unclosed quote: .*close it.*two \(\"\"\)") as err:
        read_records(path)
    assert "\n" not in str(err.value)
    # After quoted cells that legitimately hold line breaks, the line is still the one the quote opens on
    # (the record starts on line 5, its question over two lines).
    path.write_text('question,answer\n"Steps?","one\ntwo"\nWhy?,Because.\n"How\nso?","Like\nthis\n')
    with pytest.raises(UserError, match=rf"^{where}:6: unclosed quote"):
        read_records(path)


def test_quotes_inside_cells_are_text_and_a_malformed_quoted_cell_is_one_problem(tmp_path, capsys):
    (tmp_path / "d.csv").write_text('question,answer\nHe said "hi" today?,"Yes, ""hi"""\n'
                                    '"Hello," he said.,broken\n"Two\nlines?",fine\n')
    rows, problems = rows_of(tmp_path / "d.csv")
    assert rows == [(2, qa('He said "hi" today?', 'Yes, "hi"')), (4, qa("Two\nlines?", "fine"))]
    assert len(problems) == 1 and problems[0][0] == 3 and "quote" in problems[0][1]
    # Tab-separated files from most tools do not quote: a quote there is text, wherever it is.
    (tmp_path / "d.tsv").write_text('question\tanswer\n"Hello," he said.\tHe said "hi".\nQ2\t"A2\n')
    assert rows_of(tmp_path / "d.tsv") == ([(2, qa('"Hello," he said.', 'He said "hi".')), (3, qa("Q2", '"A2'))], [])
    assert f"{tmp_path / 'd.tsv'}:2: a quote here is not CSV quoting, so every quote in this .tsv is read as text" \
        in capsys.readouterr().err
    # ...and where the whole file is quoted as CSV is (pandas, spreadsheets), the quoting is undone.
    with open(tmp_path / "pandas.tsv", "w", newline="") as out:
        csv.writer(out, delimiter="\t").writerows([["question", "answer"], ['"Hi," she said?', "one\ntwo"], ["Q", "A"]])
    assert rows_of(tmp_path / "pandas.tsv") == ([(2, qa('"Hi," she said?', "one\ntwo")), (4, qa("Q", "A"))], [])


def test_excel_sep_line_blank_lines_and_empty_rows(tmp_path):
    (tmp_path / "sep.csv").write_text("sep=;\nquestion;answer\nq1, really;a1\n")
    assert rows_of(tmp_path / "sep.csv") == ([(3, qa("q1, really", "a1"))], [])
    # Blank lines before the header; Excel's formatted empty rows (delimiters only) are blank lines too.
    (tmp_path / "blank.csv").write_text("\n\nquestion,answer\nq1,a1\n,,\n , \n,,,,\nq2,a2\n")
    assert rows_of(tmp_path / "blank.csv") == ([(4, qa("q1", "a1")), (8, qa("q2", "a2"))], [])


def test_a_short_row_is_said_as_missing_its_cells_not_as_null(tmp_path, tiny_tokenizer):
    """A row with fewer cells than the header had its last cells read as JSON nulls: "field 'answer'
    is null", a word for something the file never holds."""
    (tmp_path / "short.csv").write_text("question,answer\nq1,a1\nq2 alone\n")
    assert rows_of(tmp_path / "short.csv") == ([(2, qa("q1", "a1")), (3, {"question": "q2 alone"})], [])
    found = prepare(DataConfig(train=str(tmp_path / "short.csv"), validation=str(tmp_path / "short.csv")),
                    tiny_tokenizer)
    assert [str(p) for p in found.problems][0].endswith("short.csv:3: missing field: 'answer' (the record looks like "
                                                        "format question_answer)")


def test_a_stray_quote_closed_lines_later_is_one_malformed_row_naming_its_lines(tmp_path):
    """A stray quote opening a cell and another closing it at a line's end made lines 2-4 one cell: the
    record was said as "2: missing field: 'answer'", hiding the two records it swallowed."""
    (tmp_path / "stray.csv").write_text('question,answer\n"What is a cold,A virus\nWhat is flu,Influenza\n'
                                        'What is 2+2,4 quoted"\nWhat is x,y\n')
    rows, problems = rows_of(tmp_path / "stray.csv")
    assert rows == [(5, qa("What is x", "y"))]
    assert len(problems) == 1 and problems[0][0] == 2
    assert problems[0][1].startswith("malformed CSV row (lines 2-4 read as one row of 1 cell, the header has 2: "
                                     "a quoted cell runs over line breaks; a stray quote?")
    # A quoted cell over several lines in a row of the header's width is a multi-line cell, as before.
    (tmp_path / "multi.csv").write_text('question,answer\n"Steps?","one,\ntwo"\nq,"a\nb",c\n')
    rows, problems = rows_of(tmp_path / "multi.csv")
    assert rows == [(2, qa("Steps?", "one,\ntwo"))]
    # ... and so is one in a row that leaves out its last, optional cell.
    (tmp_path / "short.csv").write_text('question,answer,system\nq1,"line one\nline two"\n')
    assert rows_of(tmp_path / "short.csv") == ([(2, qa("q1", "line one\nline two"))], [])
    assert problems == [(4, "malformed CSV row (lines 4-5 read as one row of 3 cells, the header has 2: "
                            "a quoted cell runs over line breaks; a stray quote?)")]


def test_a_pretty_printed_record_among_json_lines_is_one_problem_naming_its_lines(tmp_path):
    """A record written over lines 2-5 was four 'broken JSON' problems, one per line, none saying why."""
    (tmp_path / "p.jsonl").write_text('{"question": "q1", "answer": "a1"}\n{\n  "question": "q2",\n'
                                      '  "answer": "a2"\n}\n{"question": "q3", "answer": "a3"}\n')
    rows, problems = rows_of(tmp_path / "p.jsonl")
    assert rows == [(1, qa("q1", "a1")), (6, qa("q3", "a3"))]
    assert problems == [(2, "pretty-printed record (lines 2-5 are one record; JSON Lines holds one record per "
                            "line: jq -c . p.jsonl > lines-p.jsonl)")]
    # A chat record pretty-printed, its message objects one per line (the last parses alone), and gzipped.
    chat = ('{"question": "q1", "answer": "a1"}\n{\n  "messages": [\n    {"role": "user", "content": "hi"},\n'
            '    {"role": "assistant", "content": "yo"}\n  ]\n}\n{"question": "q3", "answer": "a3"}\n')
    with gzip.open(tmp_path / "chat.jsonl.gz", "wt") as handle:
        handle.write(chat)
    rows, problems = rows_of(tmp_path / "chat.jsonl.gz")
    assert rows == [(1, qa("q1", "a1")), (8, qa("q3", "a3"))]
    assert problems == [(2, "pretty-printed record (lines 2-7 are one record; JSON Lines holds one record per "
                            "line: zcat chat.jsonl.gz | jq -c . > lines-chat.jsonl)")]
    # One that never comes whole is one problem naming where it breaks.
    (tmp_path / "cut.jsonl").write_text('{"question": "q1", "answer": "a1"}\n{\n  "question": "q2",\n  "answer": \n}\n'
                                        '{"question": "q3", "answer": "a3"}\n')
    rows, problems = rows_of(tmp_path / "cut.jsonl")
    assert rows == [(1, qa("q1", "a1")), (6, qa("q3", "a3"))]
    assert problems == [(2, "broken JSON (lines 2-5 read as one pretty-printed record: Expecting value at line 5 "
                            "column 1)")]
    # A broken line that opens a brace and is never closed is broken JSON line by line, as before.
    (tmp_path / "b.jsonl").write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2",\n'
                                      '{"question": "q3", "answer": "a3"}\n')
    rows, problems = rows_of(tmp_path / "b.jsonl")
    assert [line for line, _ in rows] == [1, 3] and [line for line, _ in problems] == [2]
    assert problems[0][1].startswith("broken JSON")


def test_files_joined_with_cat_keep_no_second_header_nor_byte_order_mark(tmp_path):
    first = "question,answer\nq1,a1\n".encode("utf-8-sig")
    (tmp_path / "joined.csv").write_bytes(first + "question,answer\nq2,a2\n".encode("utf-8-sig"))
    assert rows_of(tmp_path / "joined.csv") == ([(2, qa("q1", "a1")), (4, qa("q2", "a2"))], [])
    line = json.dumps(qa("q", "a")) + "\n"
    (tmp_path / "joined.jsonl").write_bytes((line * 2).encode("utf-8-sig") * 2)
    assert rows_of(tmp_path / "joined.jsonl") == ([(n, qa("q", "a")) for n in (1, 2, 3, 4)], [])


# JSON under the other suffix, and line numbers

def test_a_json_list_saved_as_jsonl_and_json_lines_saved_as_json_are_read(tmp_path):
    records = [qa(f"q{i}", f"a{i}") for i in range(3)]
    (tmp_path / "pretty.jsonl").write_text(json.dumps(records, indent=1))  # [ / { / "question".. / "answer".. / }, ...
    assert rows_of(tmp_path / "pretty.jsonl") == ([(2, records[0]), (6, records[1]), (10, records[2])], [])
    (tmp_path / "pandas.jsonl").write_text(json.dumps(records))  # to_json(orient="records"): one line
    columns = [json.dumps(records).index(json.dumps(r)) + 1 for r in records]  # 2, 38, 74
    assert rows_of(tmp_path / "pandas.jsonl") == ([(f"1:{c}", r) for c, r in zip(columns, records)], [])
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records) + "\n\n{broken\n")
    rows, problems = rows_of(tmp_path / "lines.json")
    assert rows == [(1, records[0]), (2, records[1]), (3, records[2])] and [p[0] for p in problems] == [5]
    # A line that is a bare list of chat messages stays one conversation.
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    assert rows_of(tmp_path / "chat.jsonl") == ([(1, {"messages": chat})], [])


def test_records_sharing_a_line_are_told_apart_by_their_column(tmp_path, tiny_tokenizer):
    """pandas' one-line list: every record was at line 1, and a record's place is its identity, so two
    near-duplicates there were one record's examples (never reported), data.min_valid_share counted
    the file as one usable record and then failed with an IndexError, and the problems were in no order."""
    answer = ("Hold the reset button on the back of the router for ten seconds until all the lights blink, then wait two "
              "minutes for it to restart and reconnect with the default password printed on the label underneath.")
    records = [{"question": "How do I reset my router to factory settings?", "answer": answer},
               {"question": "How can I reset my router to factory settings?", "answer": answer + " "},
               *[qa(f"Question {i} on topic {7 * i}", f"Answer {i} differs {13 * i}.") for i in range(6)],
               {"question": "no answer"}, {"question": "also none"}]
    (tmp_path / "pandas.jsonl").write_text(json.dumps(records))
    write_jsonl(tmp_path / "held.jsonl", [qa("A held-out question", "Its answer")])
    cfg = DataConfig(train=str(tmp_path / "pandas.jsonl"), validation=str(tmp_path / "held.jsonl"), min_valid_share=0.75,
                     cache=False)
    prepared = prepare(cfg, tiny_tokenizer)
    train = prepared.splits["train"]
    assert len(train) == 8 and len(set(train.origins)) == 8
    [near] = report(train.conversations, train.origins, {}, cfg.near_dup_threshold)["within_train"]["first"]
    assert re.fullmatch(r".*pandas.jsonl:1:\d+ ~ .*pandas.jsonl:1:2", near)
    columns = [int(p.line.split(":")[1]) for p in prepared.problems]
    assert len(columns) == 2 and columns == sorted(columns)
    first = drop_report(prepared.problems)["missing field"]["first"]
    assert [int(f.rsplit(":", 1)[1]) for f in first] == columns


def test_a_json_line_cut_short_is_broken_where_it_ends(tmp_path):
    line = '{"question": "Where is my order?", "answer": "It shipped yesterday."'
    (tmp_path / "cut.jsonl").write_text(json.dumps(qa("q", "a")) + "\n" + line + "\n")
    [problem] = read_records(tmp_path / "cut.jsonl").problems
    assert problem.line == 2 and f"at column {len(line) + 1}" in problem.reason  # was 'column 1'


def test_json_over_several_lines_in_a_jsonl_file_that_cannot_be_read_is_one_line(tmp_path):
    (tmp_path / "broken.jsonl").write_text('[\n {"question": "q", "answer": "a"},\n {"question": \n]\n')
    with pytest.raises(UserError, match=r"broken.jsonl:4: .*not JSON Lines"):
        read_records(tmp_path / "broken.jsonl")
    (tmp_path / "jq.jsonl").write_text(json.dumps(qa("q", "a"), indent=2) + "\n" + json.dumps(qa("r", "b"), indent=2))
    with pytest.raises(UserError, match=r"jq.jsonl:5: .*one record per line.*jq -c"):
        read_records(tmp_path / "jq.jsonl")


def test_a_data_wrapper_s_records_are_found_past_an_earlier_data_key(tmp_path):
    """`{"meta": {"data": ...}, "data": [...]}`: the line numbers were counted from the nested key."""
    doc = {"meta": {"data": "v1", "tags": ["x", "y"]}, "data": [qa("Q1?", "A1."), 5, qa("Q2?", "A2."), "x"]}
    (tmp_path / "wrapped.json").write_text(json.dumps(doc, indent=2))
    rows, problems = rows_of(tmp_path / "wrapped.json")
    assert [line for line, _ in rows] == [10, 15] and [line for line, _ in problems] == [14, 19]
    (tmp_path / "twice.json").write_text('{"data": [1],\n "data": [\n  {"question": "q", "answer": "a"}]}')
    assert rows_of(tmp_path / "twice.json") == ([(3, qa("q", "a"))], [])  # json keeps the last of a repeated key


# Folders

def test_a_folder_is_read_as_the_cache_key_sees_it_and_its_subfolders_are_not_data(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    (folder / "raw").mkdir(parents=True)
    (folder / ".cache").mkdir()
    write_jsonl(folder / "a.jsonl", [qa("qa", "aa")])
    write_jsonl(folder / "b.jsonl", [qa("qb", "ab")])
    (folder / "raw" / "stats.json").write_text('{"source": "scrape"}')  # a dump beside the data: not read
    write_jsonl(folder / ".cache" / "old.jsonl", [qa("hidden", "h")])
    (folder / "README.md").write_text("# not data")
    assert [r["question"] for _, _, r in read_records(folder).rows] == ["qa", "qb"]
    assert source_files(str(folder)) == [folder / "a.jsonl", folder / "b.jsonl"]  # the cache key's files: the same
    # A Hugging Face snapshot: the card at the top, the parquet files under data/: said where they are.
    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n")
    pq.write_table(pa.Table.from_pylist([qa("q", "a")]), snapshot / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(UserError, match=r"no data files .*its subfolders do \(data/train-00000-of-00001.parquet\)"):
        read_records(snapshot)
    assert [r for _, _, r in read_records(snapshot / "data").rows] == [qa("q", "a")]


def test_a_training_folder_holding_held_out_splits_is_refused(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "download"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [qa(f"q{i}", f"a{i}") for i in range(8)])
    write_jsonl(folder / "validation-00000-of-00001.jsonl", [qa("v", "v")])
    write_jsonl(folder / "test.jsonl", [qa("t", "t")])
    named = r"holds files named as held-out splits: test.jsonl, validation-00000-of-00001.jsonl; .*data.test"
    with pytest.raises(UserError, match=named):
        read_records(folder, training="data.train")
    with pytest.raises(UserError, match=named):
        check_source(str(folder), "data.train")
    for cache in (True, False):
        with pytest.raises(UserError, match=named):
            prepare(DataConfig(train=str(folder), cache=cache), tiny_tokenizer)
    assert len(read_records(folder).rows) == 10  # not training data: read as it is
    # A folder given as data.test may well hold test files.
    tests = tmp_path / "tests"
    tests.mkdir()
    write_jsonl(tests / "test-00000.jsonl", [qa("t1", "t1")])
    write_jsonl(tests / "test-00001.jsonl", [qa("t2", "t2")])
    check_source(str(tests), "data.test")
    prepared = prepare(DataConfig(train=str(folder / "train.jsonl"), test=str(tests)), tiny_tokenizer)
    assert len(prepared.splits["test"]) == 2
    # Names that merely start with such a word are training data.
    words = tmp_path / "words"
    words.mkdir()
    names = ("testimonials", "devices", "values", "evaluations_of_x", "valid_json_outputs", "dev_docs",
             "test-driven-development", "evaluation-rubrics", "test_cases")
    for name in names:
        write_jsonl(words / f"{name}.jsonl", [qa(name, "a")])
    assert len(read_records(words, training="data.train").rows) == len(names)


# Hub ids that are mistyped paths

@pytest.fixture
def hub_offline_flags(monkeypatch):
    import datasets.config
    import huggingface_hub.constants as hub

    from tunesmith.models.load import hub_unreachable

    def set_offline(offline: bool):
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
        hub_unreachable.cache_clear()

    yield set_offline
    hub_unreachable.cache_clear()


def test_a_mistyped_local_path_without_network_fails_at_once_saying_no_such_file(tmp_path, monkeypatch,
                                                                                 hub_offline_flags):
    """`data check mydata/train_v2` spent 28 s on retried hub requests, then named only the hub."""
    import socket

    def no_network(host, *rest, **options):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    hub_offline_flags(False)
    import datasets

    tried = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: tried.append(args))  # the retried requests
    here = re.escape(str(tmp_path))
    with pytest.raises(UserError, match=rf"^mydata/train_v2: .*not reachable.*no local file or folder of that "
                                        rf"name either \(a relative path is read from the current folder, {here}\)"):
        read_records("mydata/train_v2")
    assert tried == []  # refused before any hub request


def test_a_hub_id_that_cannot_be_loaded_says_no_local_file_has_its_name(tmp_path, monkeypatch, hub_offline_flags):
    monkeypatch.chdir(tmp_path)
    hub_offline_flags(True)
    with pytest.raises(UserError, match=r"^mydata/train_v2: cannot load hub data set .*no local file or folder"):
        read_records("mydata/train_v2")
    with pytest.raises(UserError) as err:
        read_records("hf:mydata/train_v2")  # said to be a hub id: no word of local files
    assert "local file" not in str(err.value)


# Wording, compressed files, .ndjson

def test_a_missing_relative_path_names_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = re.escape(str(tmp_path))
    with pytest.raises(UserError, match=rf"^train.jsonl: data file not found.*current folder, {here}"):
        read_records("train.jsonl")


def test_compressed_files_are_read_and_a_gzip_under_a_plain_name_is_said(tmp_path):
    records = [qa(f"q{i}", f"a{i}") for i in range(3)]
    text = "\n".join(json.dumps(r) for r in records) + "\n"
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "d.json.gz").write_bytes(gzip.compress(json.dumps(records, indent=1).encode()))
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(b"question,answer\nq0,a0\nq1,a1\nq2,a2\n"))
    (tmp_path / "d.ndjson").write_text(text)
    for name in ("d.jsonl.gz", "d.json.gz", "d.csv.gz", "d.ndjson"):
        assert [r for _, _, r in read_records(tmp_path / name).rows] == records, name
    (tmp_path / "zipped.jsonl").write_bytes(gzip.compress(text.encode()))
    with pytest.raises(UserError, match=r"zipped.jsonl: gzip-compressed.*gunzip") as err:
        read_records(tmp_path / "zipped.jsonl")
    assert "iconv" not in str(err.value)
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(text.encode())[:20])
    with pytest.raises(UserError, match=r"cut.jsonl.gz: not a readable gzip file"):
        read_records(tmp_path / "cut.jsonl.gz")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "d.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    assert len(read_records(folder).rows) == 3 and source_files(str(folder)) == [folder / "d.jsonl.gz"]


def test_a_jsonl_file_is_streamed_not_read_whole(tmp_path, monkeypatch):
    """A corpus of gigabytes was read into one string (2-4 times its size in memory); only a file whose
    first line may open one JSON document is."""
    from tunesmith.data import sources

    class LinesOnly:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def __iter__(self):
            return iter(self.handle)

        def seek(self, at):
            return self.handle.seek(at)

        def read(self, *size):
            pytest.fail("the file was read whole")

    path = write_jsonl(tmp_path / "d.jsonl", [qa(f"q{i}", f"a{i}") for i in range(3)])
    opened = sources.open_text
    monkeypatch.setattr(sources, "open_text", lambda *args, **kwargs: LinesOnly(opened(*args, **kwargs)))
    assert [n for n, _ in rows_of(path)[0]] == [1, 2, 3]


def test_data_check_of_the_demo_task(tiny_model_dir, tmp_path, monkeypatch):
    from tunesmith.data.check import check_data

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    report = check_data("demo", str(tiny_model_dir), tmp_path / "out", {"demo_size": 24})
    assert (tmp_path / "out" / "report.json").is_file() and report["data"] == "demo"


def test_data_check_warns_when_the_drops_leave_no_validation_example(tiny_model_dir, tmp_path, monkeypatch):
    """`train` warned of it; `data check` printed 'validation 0' and nothing more."""
    from tunesmith.data.check import check_data, format_report

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "train.jsonl", [qa(f"q{i}", f"a{i}") for i in range(4)])
    held = write_jsonl(tmp_path / "held.jsonl", [qa("long " * 80, "a")])
    printed = format_report(check_data(str(train), str(tiny_model_dir), tmp_path / "out",
                                       {"validation": str(held), "max_seq_len": 32}))
    assert "examples: train 4, validation 0" in printed and "warning: no validation example is left" in printed
    printed = format_report(check_data(str(train), str(tiny_model_dir), tmp_path / "out", {"max_seq_len": 32}))
    assert "warning" not in printed
