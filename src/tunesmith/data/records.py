"""What the readers of data files give back (Records: rows and Problems, each with its file and line),
and how they open a text file (gzip-compressed or not, a byte-order mark dropped)."""
from __future__ import annotations

import gzip
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Problem:
    """One record that could not be used, and why; `kind` groups reasons for the counts."""

    file: str
    line: int
    reason: str
    kind: str = ""

    def __post_init__(self):
        self.kind = self.kind or self.reason.split(" (")[0].split(":")[0]

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


def commonest(problems: list[Problem], kinds: int = 3) -> str:
    """Why no record was usable: the first problem of each of the commonest kinds, with its count. The
    first problem alone could be one broken line where 39 others lacked a field."""
    counts = Counter(p.kind for p in problems)
    first: dict[str, Problem] = {}
    for problem in problems:
        first.setdefault(problem.kind, problem)
    shown = [f"{first[kind]}" + (f" ({n} like it)" if n > 1 else "") for kind, n in counts.most_common(kinds)]
    others = len(counts) - kinds
    return "; ".join(shown) + (f"; {others} other kinds" if others > 0 else "")


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
