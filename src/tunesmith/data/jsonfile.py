"""Records of .jsonl and .json data files, each with the line it starts on: JSON Lines streamed line by
line, a .jsonl that is one JSON document (a list, pretty-printed) read as a .json, JSON Lines saved
as .json read as lines, and a pretty-printed record among JSON lines said as one problem."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UserError
from .records import Problem, Records, open_text

SPACE = re.compile(r"[ \t\n\r]*")  # JSON's white space
FIRST_LINE = re.compile(r"\s*([^\n]*)")
MAX_RECORD_LINES = 1000  # a pretty-printed record is looked for over at most this many lines


def read_jsonl(path: Path) -> Records:
    """Streamed line by line (a corpus of gigabytes is not held whole), unless its first line says it
    may be one JSON document (a lone bracket, or a list)."""
    with open_text(path) as handle:
        first = next((line for line in handle if line.strip()), "").removeprefix("\ufeff").strip()
        handle.seek(0)
        if first.startswith("[") or first == "{":
            text = handle.read()
            return _json_document(path, text) or _json_lines(path, text.split("\n"))
        return _json_lines(path, handle)


def _json_lines(path: Path, lines) -> Records:
    out, opened = Records(), []  # opened: (number, line) of a record that may run over several lines
    for number, line in enumerate(lines, 1):
        line = line.removeprefix("\ufeff")  # files joined with cat keep each one's byte-order mark
        if not line.strip():
            continue
        record, reason = _json_line(line)
        # Inside an open record: an indented line (a message object of a pretty-printed chat record parses
        # alone), or one that is no JSON value by itself.
        if opened and (line[:1].isspace() or (reason and reason.startswith("broken JSON"))):
            opened.append((number, line))
            text = "\n".join(part.rstrip("\r\n") for _, part in opened)
            if _json_line(text)[0] is not None:
                out.problems.append(Problem(str(path), opened[0][0], (
                    f"pretty-printed record (lines {opened[0][0]}-{number} are one record; JSON Lines holds one record "
                    f"per line: {_one_per_line(path)})")))
                opened = []
            elif not _unfinished(text) or len(opened) > MAX_RECORD_LINES:
                _broken_record(path, opened, out)
                opened = []
            continue
        _broken_record(path, opened, out)
        opened = []
        if reason and line.lstrip().startswith("{") and _unfinished(line):
            opened = [(number, line)]
        elif reason:
            out.problems.append(Problem(str(path), number, reason))
        else:
            out.rows.append((str(path), number, record))
    _broken_record(path, opened, out)
    return out


def _one_per_line(path: Path) -> str:
    """The jq command that writes a file's JSON records one per line (a .gz decompressed first)."""
    if path.name.lower().endswith(".gz"):
        return f"zcat {path.name} | jq -c . > lines-{path.name[:-3]}"
    return f"jq -c . {path.name} > lines-{path.name}"


def _json_line(line: str) -> tuple[dict | None, str | None]:
    """A line's record, or why it is none."""
    try:
        record = as_messages(json.loads(line))
    except json.JSONDecodeError as err:
        return None, f"broken JSON ({err.msg.removesuffix(' at')} at column {err.colno})"
    except (ValueError, RecursionError) as err:  # an integer of thousands of digits, nesting past the stack
        return None, f"broken JSON ({type(err).__name__}: {str(err)[:80]})"
    if not isinstance(record, dict):
        return None, f"not a JSON object (got {type(record).__name__})"
    return record, None


def _unfinished(text: str) -> bool:
    """JSON that breaks only where the text ends: the start of a record that later lines may finish."""
    text = text.rstrip()  # a line's own end: a string left open there is broken (strings hold no line breaks)
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return err.pos >= len(text)
    except (ValueError, RecursionError):
        return False
    return False


def _broken_record(path: Path, lines: list[tuple[int, str]], out: Records) -> None:
    """Lines read as the start of a record that did not come whole: one problem at its first line."""
    if len(lines) == 1:
        # without its line break: where the text breaks off is its end, not 'column 1' of a next line
        out.problems.append(Problem(str(path), lines[0][0], _json_line(lines[0][1].rstrip("\r\n"))[1]))
    elif lines:
        try:
            json.loads("\n".join(part.rstrip("\r\n") for _, part in lines))
            where = "not one JSON object"
        except json.JSONDecodeError as err:
            where = f"{err.msg.removesuffix(' at')} at line {lines[err.lineno - 1][0]} column {err.colno}"
        except (ValueError, RecursionError) as err:
            where = type(err).__name__
        out.problems.append(Problem(str(path), lines[0][0], f"broken JSON (lines {lines[0][0]}-{lines[-1][0]} read as "
                                                             f"one pretty-printed record: {where})"))


def _json_document(path: Path, text: str) -> Records | None:
    """A .jsonl that is one JSON document (pandas' to_json(orient="records"), a pretty-printed list),
    read as a .json; None where it is JSON Lines. A first line that is a lone bracket is never JSON Lines."""
    first = FIRST_LINE.match(text).group(1).strip()
    if not first.startswith("[") and first != "{":
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if first not in ("[", "{"):
            return None  # lines that are bare lists of chat messages
        several = ("; several JSON documents one after another: write one record per line "
                   f"({_one_per_line(path)})") if err.msg == "Extra data" else ""
        raise UserError(f"{path}:{err.lineno}: not JSON Lines (one record per line), and broken JSON as one "
                        f"document ({err.msg}){several}") from None
    except (ValueError, RecursionError):
        return None  # each line is reported as it is read
    if isinstance(data, list) and as_messages(data) is not data:
        return None  # one line, a bare list of chat messages: one conversation
    return _json_records(path, text, data)


def read_json(path: Path) -> Records:
    with open_text(path) as handle:
        text = handle.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and "\n" not in text[:err.pos].strip() and text.lstrip()[:1] in "[{":
            return _json_lines(path, text.split("\n"))  # JSON Lines saved as .json: a whole value on line 1, more after
        raise UserError(f"{path}:{err.lineno}: broken JSON ({err.msg})") from None
    except (ValueError, RecursionError) as err:
        raise UserError(f"{path}: unreadable JSON ({type(err).__name__}: {str(err)[:80]})") from None
    return _json_records(path, text, data)


def _json_records(path: Path, text: str, data) -> Records:
    """The records of a parsed JSON document: a list of them, or {"data": [...]}."""
    start = 0
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data, start = data["data"], _key_value(text, "data")
    if not isinstance(data, list):
        raise UserError(f"{path}:1: expected a JSON list of records (or {{\"data\": [...]}})")
    out = Records()
    lines = _record_lines(text, start, len(data))
    for index, record in enumerate(data):
        line = lines[index] if index < len(lines) else index + 1
        record = as_messages(record)
        if isinstance(record, dict):
            out.rows.append((str(path), line, record))
        else:
            out.problems.append(Problem(str(path), line, f"not a JSON object (record {index + 1} is {type(record).__name__})"))
    return out


def _key_value(text: str, key: str) -> int:
    """Where the value of a top-level key of a JSON object starts (its last, as json.loads keeps);
    the same name nested in an earlier value is not it."""
    decoder, found = json.JSONDecoder(), 0
    at = SPACE.match(text, text.index("{") + 1).end()
    while text[at] == '"':
        name, at = decoder.raw_decode(text, at)
        at = SPACE.match(text, SPACE.match(text, at).end() + 1).end()  # past the ':'
        if name == key:
            found = at
        at = SPACE.match(text, decoder.raw_decode(text, at)[1]).end()
        at = SPACE.match(text, at + 1).end() if text[at] == "," else at
    return found


def as_messages(record):
    """A bare list of chat messages (a line `[{"role": ..., "content": ...}, ...]`) as a `messages` record."""
    if isinstance(record, list) and record and all(isinstance(m, dict) and "role" in m for m in record):
        return {"messages": record}
    return record


def _record_lines(text: str, start: int, count: int) -> list[int | str]:
    """Where each record of the JSON list at `start` starts: its line, or 'line:column' where records
    share a line (pandas' to_json(orient="records") writes them all on line 1). A record's place is
    also its identity: several examples of one place are one record's (near-duplicate search, curve)."""
    decoder = json.JSONDecoder()
    position = text.index("[", start) + 1
    places, line, counted = [], 1, 0
    while len(places) < count:
        position = SPACE.match(text, position).end()
        if text[position] == ",":
            position = SPACE.match(text, position + 1).end()
        if text[position] == "]":
            break
        line, counted = line + text.count("\n", counted, position), position
        places.append((line, position - text.rfind("\n", 0, position)))
        position = decoder.raw_decode(text, position)[1]
    shared = {line for line, _ in places if sum(other == line for other, _ in places) > 1}
    return [f"{line}:{column}" if line in shared else line for line, column in places]
