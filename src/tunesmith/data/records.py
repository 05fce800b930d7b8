"""What the readers of data files give back (Records: rows and Problems, each with its file and line),
and how they open a text file (gzip-compressed or not, a byte-order mark dropped)."""
from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path


def place(file: str, line: int | str) -> tuple[str, int, int]:
    """A record's place in file order: its line, then its column where records share a line ('1:217')."""
    if isinstance(line, str):
        number, column = line.split(":")
        return file, int(number), int(column)
    return file, line, 0


@dataclass
class Problem:
    """One record that could not be used, and why; `kind` groups reasons for the counts."""

    file: str
    line: int | str  # 'line:column' where records share a line
    reason: str
    kind: str = ""

    def __post_init__(self):
        self.kind = self.kind or self.reason.split(" (")[0].split(":")[0]

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Records:
    rows: list[tuple[str, int, dict]] = field(default_factory=list)  # (file, line, record)
    problems: list[Problem] = field(default_factory=list)


def open_text(path: Path, newline: str | None = None):
    """A text data file, decompressed where its name ends .gz; -sig: a leading byte-order mark (Windows
    editors, Excel) is not data."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)
