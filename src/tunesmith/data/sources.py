"""Read training records from files, keeping the file and line of each for error messages.

Sources: .jsonl, .json, .csv, .parquet, a folder of such files, a Hugging Face dataset folder
saved with `save_to_disk`, or a hub data set id (`datasets.load_dataset`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
HUB_ID = re.compile(r"^(hf:)?[\w.-]+/[\w.-]+$")


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


@dataclass
class Records:
    rows: list[tuple[str, int, dict]] = field(default_factory=list)  # (file, line, record)
    problems: list[Problem] = field(default_factory=list)


def is_hub_id(spec: str) -> bool:
    return not Path(spec).expanduser().exists() and bool(HUB_ID.match(spec)) and Path(spec).suffix not in SUFFIXES


def source_files(spec: str) -> list[Path]:
    """The local files behind a source (for fingerprints); empty for a hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path] if path.exists() else []


def check_source(spec: str, what: str = "data") -> None:
    """Fail early, before anything slow is loaded, when a source does not exist."""
    path = Path(spec).expanduser()
    if not is_hub_id(spec) and not path.exists():
        where = "" if path.is_absolute() else f"; a relative path is read from the current folder, {Path.cwd()}"
        raise UserError(f"{spec}: data file not found ({what}{where})")


def read_records(spec: str | Path, hub_split: str = "train") -> Records:
    """Records of a data source; unreadable lines become Problems, not crashes."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if is_hub_id(spec):
        return _read_hub(spec.removeprefix("hf:"), hub_split)
    if not path.exists():
        raise UserError(f"{path}: data file not found")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _read_saved_dataset(path, hub_split)
        # Hidden files (macOS's ._train.jsonl, an editor's .swp) are not data, as source_files says too.
        files = [p for p in sorted(path.iterdir()) if p.suffix.lower() in SUFFIXES and not p.name.startswith(".")]
        if not files:
            raise UserError(f"{path}: folder holds no data files ({', '.join(SUFFIXES)}) and no saved dataset")
        out = Records()
        for file in files:
            part = read_records(file)
            out.rows += part.rows
            out.problems += part.problems
        return out
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        spreadsheet = "; save a spreadsheet as \"CSV UTF-8\"" if suffix in (".xlsx", ".xls", ".ods", ".numbers") else ""
        raise UserError(f"{path}: unsupported data file type '{suffix}' (use {', '.join(SUFFIXES)}, "
                        f"a folder of them, a saved dataset folder or a hub data set id{spreadsheet})")
    try:
        return readers[suffix](path)
    except UnicodeDecodeError:
        raise UserError(not_utf8(path)) from None


def not_utf8(path: Path) -> str:
    """Where a file stops being UTF-8, and how to convert it (the decoder's own offset is within the
    chunk it read, not the file)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
        if head in (b"\xff\xfe", b"\xfe\xff"):
            return (f"{path}: not UTF-8 text: it starts with a UTF-16 byte-order mark; save it as UTF-8 "
                    f"(iconv -f utf-16 -t utf-8 {path.name} > utf8-{path.name})")
        handle.seek(0)
        offset = 0
        for number, line in enumerate(handle, 1):  # a multi-byte character never spans a newline
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = line[err.start]
                return (f"{path}:{number}: not UTF-8 text (byte {offset + err.start} of the file is 0x{bad:02x}); "
                        f"save it as UTF-8, e.g. from Latin-1 / Windows-1252: "
                        f"iconv -f cp1252 -t utf-8 {path.name} > utf8-{path.name}")
            offset += len(line)
    return f"{path}: not UTF-8 text"


def _read_jsonl(path: Path) -> Records:
    out = Records()
    with open(path, encoding="utf-8-sig") as lines:  # -sig: a leading byte-order mark (Windows editors, Excel) is not data
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                out.problems.append(Problem(str(path), number, f"broken JSON ({err.msg.removesuffix(' at')} at column {err.colno})"))
                continue
            except (ValueError, RecursionError) as err:  # an integer of thousands of digits, nesting past the stack
                out.problems.append(Problem(str(path), number, f"broken JSON ({type(err).__name__}: {str(err)[:80]})"))
                continue
            record = as_messages(record)
            if not isinstance(record, dict):
                out.problems.append(Problem(str(path), number, f"not a JSON object (got {type(record).__name__})"))
                continue
            out.rows.append((str(path), number, record))
    return out


def as_messages(record):
    """A bare list of chat messages (a line `[{"role": ..., "content": ...}, ...]`) as a `messages` record."""
    if isinstance(record, list) and record and all(isinstance(m, dict) and "role" in m for m in record):
        return {"messages": record}
    return record


def _read_json(path: Path) -> Records:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: broken JSON ({err.msg})") from None
    except (ValueError, RecursionError) as err:
        raise UserError(f"{path}: unreadable JSON ({type(err).__name__}: {str(err)[:80]})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{path}:1: expected a JSON list of records (or {{\"data\": [...]}})")
    out = Records()
    lines = _record_lines(text, len(data))
    for index, record in enumerate(data):
        line = lines[index] if index < len(lines) else index + 1
        record = as_messages(record)
        if isinstance(record, dict):
            out.rows.append((str(path), line, record))
        else:
            out.problems.append(Problem(str(path), line, f"not a JSON object (record {index + 1} is {type(record).__name__})"))
    return out


def _record_lines(text: str, count: int) -> list[int]:
    """Best-effort line number of each top-level record of a JSON list, for messages."""
    decoder = json.JSONDecoder()
    start = text.find("[", text.find('"data"') if text.lstrip().startswith("{") else 0)
    lines, position = [], start + 1
    while len(lines) < count:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            break
        lines.append(text.count("\n", 0, position) + 1)
        position = decoder.raw_decode(text, position)[1]
    return lines


def _read_csv(path: Path) -> Records:
    import csv

    out = Records()
    csv.field_size_limit(2**31 - 1)  # a cell may hold a whole document (the default limit is 128 KiB)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=_delimiter(path, handle.readline()))
        handle.seek(0)
        try:
            header = next(reader, None) or []
            while True:
                first = reader.line_num + 1  # a record's own line: a quoted cell may run over several
                cells = next(reader, None)
                if cells is None:
                    break
                if not cells:  # a blank line
                    continue
                if len(cells) > len(header):
                    out.problems.append(Problem(str(path), first, "malformed CSV row (more cells than columns)"))
                    continue
                out.rows.append((str(path), first, dict(zip(header, cells + [None] * (len(header) - len(cells))))))
        except csv.Error as err:
            raise UserError(f"{path}:{reader.line_num + 1}: unreadable CSV ({err})") from None
    return out


def _delimiter(path: Path, header: str) -> str:
    """Tab for .tsv; for .csv a comma, unless the header has none and semicolons or tabs (spreadsheets
    set to a locale with decimal commas write semicolons)."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    if "," in header:
        return ","
    return max(";\t", key=header.count) if any(c in header for c in ";\t") else ","


def _read_parquet(path: Path) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow (pip install 'tunesmith[data]')") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]})") from None
    return Records(rows=[(str(path), index, row) for index, row in enumerate(rows, 1)])


def _dataset_rows(dataset, name: str) -> Records:
    # Media stays undecoded, in lists and nested records too: training reads text, and decoding an
    # image or audio value would open whatever path or address a row names (a saved data set from
    # elsewhere can name any).
    from datasets import Features

    features = dict(dataset.features)
    wanted = undecoded(features)
    if wanted != features:
        dataset = dataset.cast(Features(wanted))
    return Records(rows=[(name, index, dict(row)) for index, row in enumerate(dataset, 1)])


def undecoded(feature):
    """A data set feature (a column's type) with every decodable part (Image, Audio, Video...) set not to decode."""
    import dataclasses

    if isinstance(feature, dict):
        return {key: undecoded(value) for key, value in feature.items()}
    if isinstance(feature, (list, tuple)):
        return type(feature)(undecoded(value) for value in feature)
    if not dataclasses.is_dataclass(feature):
        return feature
    if getattr(feature, "decode", None) is True:
        return dataclasses.replace(feature, decode=False)
    inner = getattr(feature, "feature", None)  # List, LargeList, Sequence: their items' type
    return dataclasses.replace(feature, feature=undecoded(inner)) if inner is not None else feature


def _read_saved_dataset(path: Path, split: str) -> Records:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as err:  # a damaged dataset_info.json, dataset_dict.json or arrow file: several types
        raise UserError(f"{path}: not a readable saved data set ({type(err).__name__}: {str(err)[:160]})") from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UserError(f"{path}: saved dataset has no split '{split}' (has {', '.join(dataset)}); set data.hub_split")
        dataset = dataset[split]
    return _dataset_rows(dataset, str(path))


def _read_hub(name: str, split: str) -> Records:
    """A data set from the Hugging Face hub (or its local cache)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError(f"{name}: hub data sets need the 'datasets' package (pip install 'tunesmith[data]')") from None
    try:
        dataset = load_dataset(name, split=split)
    except Exception as err:  # network, missing data set or split: all end as one user-facing line
        raise UserError(f"{name}: cannot load hub data set ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    return _dataset_rows(dataset, name)
