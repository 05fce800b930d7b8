"""Read training records from files, keeping the file and line of each for error messages.

Sources: .jsonl (.ndjson), .json, .csv, .tsv (these also gzip-compressed), .parquet, a folder of such
files, a Hugging Face dataset folder saved with `save_to_disk`, or a hub data set id (hfdata.py).
"""
from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

from ..errors import UserError
from .csvfile import csv_rows
from .hfdata import arrow_record, read_hub, read_saved
from .jsonfile import read_json, read_jsonl
from .records import Problem, Records, open_text

TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")  # also read gzip-compressed (.jsonl.gz)
SUFFIXES = (*TEXT_SUFFIXES, ".parquet")
HUB_ID = re.compile(r"^(hf:)?[\w.-]+/[\w.-]+$")
# A file named as a held-out split, its whole name but a shard number (test.jsonl, validation-00000-of-00001.parquet,
# dev.csv), not test-driven-development.jsonl or valid_json_outputs.jsonl.
HELD_OUT = re.compile(r"(test|validation|valid|val|dev|eval|evaluation)([-_.]?\d[\w.-]*)?", re.IGNORECASE)


def data_suffix(path: Path) -> str:
    """The type a file's name says: '.jsonl' for train.jsonl and train.jsonl.gz."""
    name = path.name.lower()
    inner = Path(name.removesuffix(".gz")).suffix
    return inner if name.endswith(".gz") and inner in TEXT_SUFFIXES else Path(name).suffix


def is_hub_id(spec: str) -> bool:
    return not Path(spec).expanduser().exists() and bool(HUB_ID.match(spec)) and data_suffix(Path(spec)) not in SUFFIXES


def _saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _visible(folder: Path) -> list[Path]:
    """A folder's files in its subfolders too, sorted; hidden ones (macOS's ._train.jsonl, an editor's
    .swp, a download's .cache/) are not data."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def data_files(folder: Path) -> list[Path]:
    """The data files read from a folder (not a saved data set's), as source_files and read_records see
    them: its own, not its subfolders' (backups and raw dumps there are not training data)."""
    return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
            and data_suffix(p) in SUFFIXES]


def source_files(spec: str) -> list[Path]:
    """The local files behind a source (for fingerprints): the files read_records reads; empty for a hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _visible(path) if _saved_dataset(path) else data_files(path)
    return [path] if path.exists() else []


def not_found(spec: str, what: str = "") -> str:
    relative = "" if Path(spec).expanduser().is_absolute() else \
        f"a relative path is read from the current folder, {Path.cwd()}"
    detail = "; ".join(part for part in (what, relative) if part)
    return f"{spec}: data file not found" + (f" ({detail})" if detail else "")


def check_source(spec: str, what: str = "data") -> None:
    """Fail early, before anything slow is loaded, when a source does not exist (or is a training
    folder holding held-out splits)."""
    path = Path(spec).expanduser()
    if not is_hub_id(spec) and not path.exists():
        raise UserError(not_found(spec, what))
    if what == "data.train" or what.startswith("data.mix"):
        refuse_held_out(path, what)


def _stem(path: Path) -> str:
    """A data file's name without its type: 'test-00000' of test-00000.jsonl.gz."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return name[:len(name) - len(Path(name).suffix)]


def refuse_held_out(path: Path, what: str = "data.train") -> None:
    """A training folder holding files named as test or validation splits (test.jsonl beside
    train.jsonl, a download's validation-00000-of-00001.parquet) would train on them without a word."""
    if not path.is_dir() or _saved_dataset(path):
        return
    named = [p.name for p in data_files(path) if HELD_OUT.fullmatch(_stem(p))]
    if named:
        more = f" and {len(named) - 5} more" if len(named) > 5 else ""
        raise UserError(f"{path}: this folder of training data ({what}) holds files named as held-out splits: "
                        f"{', '.join(named[:5])}{more}; name them in data.test / data.validation, and give "
                        f"data.train the training file(s) or a folder of training files only")


def read_records(spec: str | Path, hub_split: str = "train", training: str | None = None) -> Records:
    """Records of a data source; unreadable lines become Problems, not crashes. `training`: the setting
    naming the source where it is training data (data.train, data.mix): held-out splits are refused."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if is_hub_id(spec):
        return Records(rows=read_hub(spec, hub_split))
    if not path.exists():
        raise UserError(not_found(spec))
    if path.is_dir():
        if _saved_dataset(path):
            return Records(rows=read_saved(path, hub_split))
        if training:
            refuse_held_out(path, training)
        files = data_files(path)
        if not files:
            deeper = [p.relative_to(path).as_posix() for p in _visible(path) if data_suffix(p) in SUFFIXES]
            where = f"; its subfolders do ({', '.join(deeper[:3])}): name that folder or those files" if deeper else ""
            raise UserError(f"{path}: folder holds no data files ({', '.join(SUFFIXES)}) and no saved dataset{where}")
        out = Records()
        for file in files:
            part = read_records(file)
            out.rows += part.rows
            out.problems += part.problems
        return out
    suffix = data_suffix(path)
    readers = {".jsonl": read_jsonl, ".ndjson": read_jsonl, ".json": read_json, ".csv": _read_csv,
               ".tsv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        spreadsheet = "; save a spreadsheet as \"CSV UTF-8\"" if suffix in (".xlsx", ".xls", ".ods", ".numbers") else ""
        raise UserError(f"{path}: unsupported data file type '{suffix}' (use {', '.join(SUFFIXES)}, the text ones "
                        f"also gzip-compressed (.jsonl.gz), a folder of them, a saved dataset folder or a hub data "
                        f"set id{spreadsheet})")
    try:
        return readers[suffix](path)
    except UnicodeDecodeError:
        raise UserError(not_utf8(path)) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:  # a .gz cut short or damaged
        raise UserError(f"{path}: not a readable gzip file ({err})") from None


def not_utf8(path: Path) -> str:
    """What a file that is not UTF-8 text is, or where it stops being UTF-8 and how to convert it (the
    decoder's own offset is within the chunk it read, not the file)."""
    gz = path.name.lower().endswith(".gz")
    with (gzip.open if gz else open)(path, "rb") as handle:
        head = handle.read(4)
        if head[:2] == b"\x1f\x8b":
            return (f"{path}: gzip-compressed, not text; decompress it (gunzip -c {path.name} > unzipped-{path.name}), "
                    f"or name it {path.name}.gz to have it read as it is")
        if head == b"PAR1":
            return f"{path}: a parquet file, not text: name it {Path(path.name).stem}.parquet"
        if head == b"PK\x03\x04":
            return (f"{path}: a zip archive, not text (an Excel workbook is one: save it as \"CSV UTF-8\"); "
                    "unzip it and give the file inside")
        convert = f"zcat {path.name} | iconv -f {{}} -t utf-8" if gz else f"iconv -f {{}} -t utf-8 {path.name}"
        convert += f" > utf8-{path.name.removesuffix('.gz') if gz else path.name}"
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return (f"{path}: not UTF-8 text: it starts with a UTF-16 byte-order mark; save it as UTF-8 "
                    f"({convert.format('utf-16')})")
        handle.seek(0)
        offset = 0
        for number, line in enumerate(handle, 1):  # a multi-byte character never spans a newline
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = line[err.start]
                return (f"{path}:{number}: not UTF-8 text (byte {offset + err.start} of the file"
                        f"{' decompressed' if gz else ''} is 0x{bad:02x}); save it as UTF-8, e.g. from Latin-1 / "
                        f"Windows-1252: {convert.format('cp1252')}")
            offset += len(line)
    return f"{path}: not UTF-8 text"


def _read_csv(path: Path) -> Records:
    out = Records()
    with open_text(path, newline="") as handle:
        for line, row in csv_rows(handle, path, data_suffix(path) == ".tsv"):
            if isinstance(row, str):
                out.problems.append(Problem(str(path), line, row))
            else:
                out.rows.append((str(path), line, row))
    return out


def _read_parquet(path: Path) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow (pip install 'tunesmith[data]')") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]})") from None
    return Records(rows=[(str(path), index, arrow_record(row)) for index, row in enumerate(rows, 1)])
