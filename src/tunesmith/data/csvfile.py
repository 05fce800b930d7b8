"""Rows of .csv and .tsv data files as spreadsheets and scripts write them, each with the line it starts on.

Quoting is read strictly, so a stray quote is an error at its line instead of a cell that swallows
the rest of the file. A .tsv is read with quotes as text unless its quoting is CSV's throughout (most
tools do not quote tab-separated files; pandas and spreadsheets do).
"""
from __future__ import annotations

import csv
import re
from itertools import chain, islice
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..progress import say

SEP_LINE = re.compile(r'"?sep=(.)"?[,;\t]*\s*')  # Excel's first line naming the delimiter


class _BadQuoting(Exception):
    """A quoted cell runs to the end of the file, or (in a .tsv) any quoting error: a .csv is refused,
    a .tsv read again with quotes as text."""

    def __init__(self, first: int, delimiter: str):
        super().__init__(first)
        self.first, self.delimiter = first, delimiter  # the record's first line


def csv_rows(handle, path: Path, tsv: bool) -> list[tuple[int, dict | str]]:
    """(line, record) of each row of an open .csv / .tsv file, (line, reason) of each malformed one."""
    csv.field_size_limit(2**31 - 1)  # a cell may hold a whole document (the default limit is 128 KiB)
    try:
        return list(_rows(handle, path, tsv, csv.QUOTE_MINIMAL))
    except _BadQuoting as bad:
        if not tsv:
            handle.seek(0)
            record = [line.removeprefix("\ufeff") for line in islice(handle, bad.first - 1, None)]
            raise UserError(f"{path}:{bad.first + _opening_line(record, bad.delimiter)}: unclosed quote: the quoted "
                            "cell that starts on this line never ends, so the rest of the file would be one cell; "
                            "close it with a quote, or write a quote inside a cell as two (\"\")") from None
        # Said: a file quoted as CSV but for one stray quote would have its quoted cells split otherwise unseen.
        say(f"{path}:{bad.first}: a quote here is not CSV quoting, so every quote in this .tsv is read as text "
            "(a quoted cell holding a tab or a line break would be split: quote as CSV throughout, or not at all)")
    handle.seek(0)
    return list(_rows(handle, path, tsv, csv.QUOTE_NONE))


def _rows(handle, path: Path, tsv: bool, quoting: int) -> Iterator[tuple[int, dict | str]]:
    lines = (line.removeprefix("\ufeff") for line in handle)  # files joined with cat keep each one's mark
    skipped, head, delimiter = _header_line(lines, tsv)
    if head is None:
        return
    reader = csv.reader(chain([head], lines), delimiter=delimiter, quoting=quoting, strict=True)
    try:
        header = _next(reader, tsv, skipped + 1, delimiter)
    except csv.Error as err:  # no rows without it
        raise UserError(f"{path}:{skipped + 1}: unreadable CSV header ({_quote_reason(err)})") from None
    while True:
        first = skipped + reader.line_num + 1  # a record's own line: a quoted cell may run over several
        try:
            cells = _next(reader, tsv, first, delimiter)
        except csv.Error as err:
            last = skipped + reader.line_num
            yield first, f"malformed CSV row ({f'lines {first}-{last}: ' if last > first else ''}{_quote_reason(err)})"
            continue
        if cells is None:
            return
        if not "".join(cells).strip() or cells == header:
            continue  # a blank line, a row of delimiters only (Excel's), a header repeated (files joined)
        last = skipped + reader.line_num
        if last > first and _swallowed(cells, header, delimiter):  # a stray quote would hide the rows it swallowed
            yield first, (f"malformed CSV row (lines {first}-{last} read as one row of {len(cells)} "
                          f"cell{'s' * (len(cells) > 1)}, the header has {len(header)}: a quoted cell runs over "
                          "line breaks; a stray quote?)")
            continue
        if len(cells) > len(header):
            yield first, "malformed CSV row (more cells than columns)"
            continue
        yield first, dict(zip(header, cells))  # a short row lacks its last cells: said as missing fields, not nulls


def _swallowed(cells: list[str], header: list[str], delimiter: str) -> bool:
    """Whether a record over several lines is rows run together by a stray quote: more cells than the
    header, or fewer with a line inside a cell that is a whole row itself (a multi-line cell in a row
    that leaves out its last, optional cells is read as it is)."""
    if len(cells) > len(header):
        return True
    return len(cells) < len(header) and any(line.count(delimiter) >= len(header) - 1
                                            for cell in cells for line in cell.splitlines()[1:])


def _next(reader, tsv: bool, first: int, delimiter: str) -> list[str] | None:
    """The next row; a quoting error in a .tsv means its quotes are text (the caller reads it again)."""
    try:
        return next(reader, None)
    except csv.Error as err:
        if tsv or "unexpected end of data" in str(err):
            raise _BadQuoting(first, delimiter) from None
        raise


def _quote_reason(err: csv.Error) -> str:
    if "expected after" in str(err):
        return "text after the closing quote of a quoted cell; write a quote inside a cell as two (\"\")"
    return str(err)


def _header_line(lines, tsv: bool) -> tuple[int, str | None, str]:
    """The header's line, past blank lines and Excel's `sep=;` line (how many), and the delimiter."""
    sep, skipped = None, 0
    for line in lines:
        found = SEP_LINE.fullmatch(line) if sep is None else None
        if found or not line.strip():
            sep, skipped = found.group(1) if found else sep, skipped + 1
            continue
        return skipped, line, sep or _delimiter(tsv, line)
    return skipped, None, ","


def _delimiter(tsv: bool, header: str) -> str:
    """Tab for .tsv; for .csv a comma, unless the header has none and semicolons or tabs (spreadsheets
    set to a locale with decimal commas write semicolons)."""
    if tsv:
        return "\t"
    if "," in header:
        return ","
    return max(";\t", key=header.count) if any(c in header for c in ";\t") else ","


def _opening_line(lines: list[str], delimiter: str) -> int:
    """Which of a record's lines opens the quoted cell that is never closed (strict quoting: a quote
    opens a cell only at its start; inside one, two quotes are a quote)."""
    quoted, opened = False, 0
    for index, line in enumerate(lines):
        at = line.find('"')
        while at >= 0:
            if quoted and line.startswith('""', at):
                at = line.find('"', at + 2)
                continue
            if quoted:
                quoted = False
            elif at == 0 or line[at - 1] == delimiter:
                quoted, opened = True, index
            at = line.find('"', at + 1)
    return opened
