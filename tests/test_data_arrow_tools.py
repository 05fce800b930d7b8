"""Tool-calling data read through Arrow (parquet, a saved or hub data set) keeps each record's own tools
and calls (walk-through 3). Arrow gives a column of objects the union of every row's keys and fills the
keys a row lacks with null: a get_weather(city) record read `"properties": {"city": ..., "query": null,
"limit": null}` (another record's parameters) and trained the call `{"city": "Rome", "query": null,
"limit": null}`; such a schema is not JSON Schema, so a call against its `additionalProperties: false`
went unchecked."""
from __future__ import annotations

import copy

import pytest

from tunesmith.data.formats import to_example
from tunesmith.data.sources import read_records
from tunesmith.data.tools import FormatError

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}]
SEARCH = [{"type": "function", "function": {"name": "search", "description": "Search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["query"]}}}]


def conversation(question: str, name: str, arguments: dict, answer: str) -> list[dict]:
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": name, "arguments": arguments}}]},
            {"role": "tool", "content": "done"}, {"role": "assistant", "content": answer}]


RECORDS = [{"messages": conversation("Weather in Oslo?", "get_weather", {"city": "Oslo"}, "3C in Oslo."), "tools": WEATHER},
           {"messages": conversation("Find cats", "search", {"query": "cats", "limit": 3}, "Found 3."), "tools": SEARCH},
           # a call passing what get_weather does not take: its schema refuses it
           {"messages": conversation("Weather in Rome?", "get_weather", {"city": "Rome", "query": "x"}, "20C."),
            "tools": WEATHER}]


def check_rows(rows: list[tuple]) -> None:
    assert len(rows) == 3
    for (_, _, row), record in zip(rows, RECORDS):
        assert row["tools"] == record["tools"]  # no foreign "query": null / "additionalProperties": null
        assert row["messages"][1]["tool_calls"] == record["messages"][1]["tool_calls"]
        assert row["messages"][0]["content"] == record["messages"][0]["content"]
    assert to_example(rows[0][2]) and to_example(rows[1][2])
    with pytest.raises(FormatError, match=r"arguments: Additional properties .*'query'"):
        to_example(rows[2][2])


def test_a_parquet_file_written_by_pandas_keeps_each_records_own_tools_and_calls(tmp_path):
    import pandas as pd

    pd.DataFrame({"messages": [r["messages"] for r in RECORDS], "tools": [r["tools"] for r in RECORDS]}).to_parquet(
        tmp_path / "tools.parquet")
    check_rows(read_records(tmp_path / "tools.parquet").rows)


def test_a_saved_data_set_keeps_each_records_own_tools_and_calls(tmp_path):
    from datasets import Dataset

    Dataset.from_list(copy.deepcopy(RECORDS)).save_to_disk(str(tmp_path / "saved"))
    check_rows(read_records(tmp_path / "saved").rows)


def test_only_nulls_inside_tools_and_tool_calls_are_dropped():
    """A message's own null (a weight, a content, a tool_calls of a plain answer) reads as before; inside a
    pair's sides the calls are cleaned too; a null in a list stays (an enum may hold one)."""
    from tunesmith.data.hfdata import arrow_record

    call = {"id": None, "type": "function", "function": {"name": "f", "arguments": {"a": 1, "b": None}}}
    record = {"Tools": [{"type": "function", "function": {"name": "f", "parameters": {
                  "type": "object", "properties": {"a": {"enum": [1, None]}, "b": None}, "required": None}}}],
              "prompt": [{"role": "user", "content": "q", "tool_calls": None, "weight": None}],
              "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}],
              "rejected": [{"role": "assistant", "content": "no", "tool_calls": None}], "score": None}
    assert arrow_record(record) == {
        "Tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"enum": [1, None]}}}}}],
        "prompt": [{"role": "user", "content": "q", "tool_calls": None, "weight": None}],
        "chosen": [{"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}],
        "rejected": [{"role": "assistant", "content": "no", "tool_calls": None}], "score": None}
