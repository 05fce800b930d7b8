"""A cache of prepared (tokenised) data, so a second run or data check starts at once.

The key is a hash of the data files' contents, the data settings with the text of the chat
template the data is rendered with (not the path of a .jinja file, which can be edited), the
tokenizer spec and the contents of the tokenizer's files (where it is a local folder: its own
template lives there). An entry also records the size and modification time of the tokenizer's
files and is used only while they are unchanged (this covers a spec such as 'default' that
names a folder only once resolved). Checking an entry needs neither torch nor transformers.
Entries are plain JSON and NumPy arrays (no pickle), written to a temporary folder and renamed
when whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# 4: fields in their common spellings, content parts, assistant weight 0, BOMs, bare message lists;
# 5: test examples kept whatever their length; 6: raw text rows name the document they start in,
# raw text test documents whole; 7: duplicates across data.mix sources removed, every training
# example near an eval one removed, a weight-0 answer's conversation cut right, hidden files skipped;
# 8: a CSV record's origin is the line it starts on; 9: a null text is dropped as empty, not missing;
# 10: a conversation ending after its last answer is refused, roles read in any case;
# 11: tool-call arguments checked against their JSON schema (types, enums); 12: files read as they are
# meant (CSV quoting strict, a .tsv's quotes as text, Excel's blank rows and repeated headers skipped,
# a {"data": [...]} record's line past an earlier "data" key, a JSON list saved as .jsonl; records
# holding half a character or a turn's special token as text dropped, numbers read as text, role aliases);
# 13: a short CSV row lacks fields; 14: a stray quote's multi-line row is malformed; 15: a pretty-printed
# record among JSON lines is one problem; 16: so is a pretty-printed chat record (its lines indented);
# 17: a short CSV row with a multi-line cell is read unless a line in it is a whole row;
# 18: a conversation opening with an assistant turn learns that turn, not the template's preamble;
# 19: records of a JSON list that share a line are told apart by their column ('1:217');
# 20: KTO labels as text (a CSV's), numeric Alpaca input, swapped columns, `text` beside other text
# refused, a record's own `system` / `system_prompt` field as its system turn; 21: Arrow's invented
# nulls dropped inside tools and tool calls (parquet, saved and hub data sets); 22: a mapped column
# found in another case or with spaces around, an empty system turn read as none.
FORMAT_VERSION = 22
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")
EXTRA_TEMPLATES = "additional_chat_templates"  # transformers' folder of further named templates


def cache_root() -> Path:
    # Same variable as the model cache (tunesmith.models.default); read here without importing torch.
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith")).expanduser() / "data"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def data_key(settings: dict, files: list[Path], tokenizer_spec: str, tokenizer_folder: str | None = None) -> str:
    parts = {"version": FORMAT_VERSION, "settings": settings, "tokenizer": tokenizer_spec,
             "tokenizer_files": tokenizer_digests(tokenizer_folder),
             "files": [[str(f.resolve()), file_digest(f)] for f in files]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenizer_paths(folder: str | None) -> list[Path]:
    """The tokenizer's files in a local folder (vocabulary, config, chat templates); none elsewhere."""
    if not folder or not Path(folder).is_dir():
        return []
    base = Path(folder)
    found = [base / name for name in TOKENIZER_FILES if (base / name).is_file()]
    return found + sorted(p for p in (base / EXTRA_TEMPLATES).glob("*.jinja") if p.is_file())


def tokenizer_digests(folder: str | None) -> dict[str, str]:
    """The contents (sha256) of the tokenizer's files: a changed tokenizer or template is another key."""
    return {path.relative_to(folder).as_posix(): file_digest(path) for path in tokenizer_paths(folder)}


def tokenizer_stamps(folder: str | None) -> dict[str, list[int]]:
    """Size and mtime of the tokenizer's files: a changed tokenizer invalidates the entries made with it."""
    stamps = {}
    for path in tokenizer_paths(folder):
        stat = path.stat()
        stamps[str(path.resolve())] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def _still_valid(stamps: dict[str, list[int]]) -> bool:
    for path, (size, mtime) in stamps.items():
        try:
            stat = Path(path).stat()
        except OSError:
            return False
        if [stat.st_size, stat.st_mtime_ns] != [size, mtime]:
            return False
    return True


def load(key: str) -> tuple[dict, dict] | None:
    """(meta, arrays) of a usable entry, else None."""
    import numpy as np

    folder = cache_root() / key
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if not _still_valid(meta.get("tokenizer_stamps", {})):
            return None
        with np.load(folder / "tokens.npz") as arrays:
            return meta, {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, KeyError):
        return None


def store(key: str, meta: dict, arrays: dict) -> Path | None:
    """Write an entry; a cache that cannot be written (read-only, full disk) only costs speed."""
    import numpy as np

    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        np.savez(tmp / "tokens.npz", **arrays)
        final = root / key
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final
    except OSError:
        shutil.rmtree(locals().get("tmp", root / ".none"), ignore_errors=True)
        return None


def entry_file(key: str, name: str) -> Path | None:
    path = cache_root() / key / name
    return path if path.exists() else None


def add_text(key: str, name: str, text: str) -> None:
    """Put a derived result beside an entry, whole or not at all."""
    _put(key, name, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def add_file(key: str, name: str, source: Path) -> None:
    """Put a derived file (e.g. the length histogram) beside an entry, whole or not at all."""
    _put(key, name, lambda tmp: shutil.copyfile(source, tmp))


def _put(key: str, name: str, write) -> None:
    """write(path) aside, then renamed: a reader never sees half a file."""
    folder = cache_root() / key
    if not folder.is_dir():
        return
    tmp = folder / f".tmp-{os.getpid()}-{name}"
    try:
        write(tmp)
        os.replace(tmp, folder / name)
    except OSError:  # a cache that cannot be written only costs speed; no partial file is left
        tmp.unlink(missing_ok=True)


def tokenizer_folder(tokenizer) -> str | None:
    """The local folder of a tokenizer spec or a loaded tokenizer (resolved), else None."""
    name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", "")
    return str(Path(name).expanduser().resolve()) if name and Path(name).expanduser().is_dir() else None


def vocabulary_hash(tokenizer) -> str:
    """A loaded tokenizer from no local folder: a hash of its whole vocabulary."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def template_for_key(setting: str | None, tokenizer, folder: str | None) -> dict:
    """What decides the rendered text: a configured template's text (a .jinja file's contents, not
    its path), or the tokenizer's own one, whose text is in the tokenizer's files (hashed into the
    key) unless it was changed in memory since loading, or the tokenizer comes from no folder."""
    from .templates import FALLBACK_TEMPLATE, template_text

    if setting is not None:
        return {"text": template_text(setting)}
    own = {"own": True, "fallback": FALLBACK_TEMPLATE}  # the fallback renders where the tokenizer has none
    if isinstance(tokenizer, str):
        return own
    current = getattr(tokenizer, "chat_template", None)
    if folder and current == getattr(tokenizer, "init_kwargs", {}).get("chat_template"):
        return own
    return {**own, "text": current}
