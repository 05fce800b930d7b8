"""Read training records from files, keeping the line number of each for error messages."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError


@dataclass
class Problem:
    """One record that could not be used, and why."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Records:
    rows: list[tuple[int, dict]] = field(default_factory=list)  # (line, record)
    problems: list[Problem] = field(default_factory=list)


def read_records(path: str | Path) -> Records:
    """Records of a .jsonl, .json or .csv file; unreadable lines become Problems, not crashes."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: data file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a data file (.jsonl, .json, .csv)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".csv":
            return _read_csv(path)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    raise UserError(f"{path}: unsupported data file type '{suffix}' (use .jsonl, .json or .csv)")


def _read_jsonl(path: Path) -> Records:
    out = Records()
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                out.problems.append(Problem(str(path), number, f"broken JSON ({err.msg} at column {err.colno})"))
                continue
            if not isinstance(record, dict):
                out.problems.append(Problem(str(path), number, f"expected a JSON object, got {type(record).__name__}"))
                continue
            out.rows.append((number, record))
    return out


def _read_json(path: Path) -> Records:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: broken JSON ({err.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records")
    out = Records()
    for index, record in enumerate(data, 1):
        if isinstance(record, dict):
            out.rows.append((index, record))
        else:
            out.problems.append(Problem(str(path), index, f"record {index} is not a JSON object"))
    return out


def _read_csv(path: Path) -> Records:
    import csv

    out = Records()
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            out.rows.append((reader.line_num, dict(row)))
    return out
