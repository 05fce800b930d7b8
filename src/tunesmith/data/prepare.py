"""From the data config to tokenised train / validation / test splits, with a summary of what was done.

read (file, line) -> validate (format, roles, text) -> deduplicate -> split (seeded) -> mix by
weight -> tokenise (one batch) -> length policy. Every record left out is a Problem with file,
line and reason; the whole result is cached (see cache.py).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig
from ..errors import UserError
from ..progress import say
from . import cache
from .formats import FormatError, rename_columns, to_example
from .lengths import hint_line, length_hint
from .records import place
from .sources import Problem, check_source, is_hub_id, read_records, source_files
from .templates import use_template
from .tokenize import IGNORE, Encoded, TemplateError, encode_documents, encode_many, encode_text
from .validate import deduplicate, drop_report, overlap, problems_before, refuse_mixed_test, skipped_lines, unusable

SPLITS = ("train", "validation", "test")


@dataclass
class Split:
    name: str
    conversations: list[list[dict]] = field(default_factory=list)
    encoded: list[Encoded] = field(default_factory=list)
    origins: list[tuple[str, int]] = field(default_factory=list)  # (file, line) of each example

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.encoded)

    def select(self, indices, name: str | None = None) -> "Split":
        """The examples at `indices`, in that order (under another name if given)."""
        return Split(name or self.name, [self.conversations[i] for i in indices], [self.encoded[i] for i in indices],
                     [self.origins[i] for i in indices])


@dataclass
class Prepared:
    splits: dict[str, Split]
    problems: list[Problem]
    dropped: Counter
    formats: Counter = field(default_factory=Counter)
    records: int = 0  # training records read
    template: str = ""
    overlap: dict[str, list[str]] = field(default_factory=dict)  # split -> 'file:line' also in train
    truncated: int = 0
    # [tokens, index of the first label or -1] of each example over max_seq_len (dropped or truncated)
    too_long: list[list[int]] = field(default_factory=list)
    cached: bool = False
    cache_key: str | None = None

    def summary(self) -> dict:
        return {
            "examples": {name: len(s) for name, s in self.splits.items()},
            "tokens": {name: s.tokens for name, s in self.splits.items()},
            "label_tokens": {name: sum(e.label_count for e in s.encoded) for name, s in self.splits.items()},
            "dropped": dict(self.dropped),
            "first_problems": [str(p) for p in self.problems[:5]],
            "formats": dict(self.formats),
            "template": self.template,
            "truncated": self.truncated,
            "overlap_with_train": {name: len(lines) for name, lines in self.overlap.items()},
        }

    def drop_report(self) -> dict[str, dict]:
        return drop_report(self.problems)


def load_conversations(path: str, system_prompt: str | None, fmt: str = "auto", columns: dict | None = None,
                       hub_split: str = "train", origins: bool = False) -> tuple:
    """Chat messages of every valid record of a source, (with `origins`, their (file, line),) and a
    Problem for each invalid one."""
    conversations, where, _, problems = _read_source(path, system_prompt, fmt, columns or {}, hub_split)
    return (conversations, where, problems) if origins else (conversations, problems)


def _read_source(path, system_prompt, fmt, columns, hub_split, training: str | None = None):
    records = read_records(path, hub_split, training)
    conversations, origins, formats, problems = [], [], Counter(), list(records.problems)
    for file, line, record in records.rows:
        try:
            kind, messages = to_example(rename_columns(record, columns), fmt, system_prompt)
        except FormatError as err:
            problems.append(Problem(file, line, str(err) + unmapped_columns(record, columns), err.kind))
            continue
        conversations.append(messages)
        origins.append((file, line))
        formats[kind] += 1
    return conversations, origins, formats, problems


def unmapped_columns(record: dict, columns: dict) -> str:
    """What to add to a record's problem where data.columns names a column the record does not have
    (a misspelt header): the name asked for and the record's own."""
    absent = [f"{field}: '{column}'" for field, column in columns.items() if column not in record and field not in record]
    return (f"; data.columns names {', '.join(absent)}, not a column of this record (it has: "
            f"{', '.join(map(str, record))})" if absent else "")


def _read_kept(spec: str, cfg: DataConfig, seen: dict, training: str | None = None):
    """_read_source, less the duplicates of records read before (in `seen`) where data.dedup says so;
    each duplicate is a Problem. `training`: the setting naming a training source (read_records)."""
    conversations, origins, formats, problems = _read_source(spec, cfg.system_prompt, cfg.format, cfg.columns,
                                                             cfg.hub_split, training)
    if cfg.dedup:
        keep, duplicates, _ = deduplicate(conversations, origins, seen)
        problems += duplicates
        conversations, origins = [conversations[i] for i in keep], [origins[i] for i in keep]
    return conversations, origins, formats, problems


def prepare(cfg: DataConfig, tokenizer, out_dir: Path | None = None) -> Prepared:
    """Read, validate, split and tokenise the data; the demo task is generated here.

    `tokenizer` is a loaded tokenizer, or a model spec that is loaded only when the cache misses.
    """
    sources = {name: getattr(cfg, name) for name in SPLITS if getattr(cfg, name)}
    sources.update({f"mix:{spec}": spec for spec in cfg.mix})
    key = _cache_key(cfg, sources, tokenizer)
    if key:
        hit = cache.load(key)
        if hit:
            if not isinstance(tokenizer, str):
                use_template(tokenizer, cfg.chat_template, cfg.template_variables)
            prepared = _from_cache(*hit)
            prepared.cache_key = key
            return prepared
    if isinstance(tokenizer, str):
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    template = use_template(tokenizer, cfg.chat_template, cfg.template_variables)
    prepared = _prepare(cfg, tokenizer, out_dir)
    prepared.template, prepared.cache_key = template, key
    if key:
        cache.store(key, *_to_cache(prepared, tokenizer))
    return prepared


def eval_file(spec: str, tokenizer, cfg: DataConfig, limit: int | None = None) -> Split:
    """One file for `tunesmith eval`, read and encoded once, as a test split (every example whole,
    duplicates within it dropped); `limit`: its first N examples only, the rest never encoded."""
    use_template(tokenizer, cfg.chat_template, cfg.template_variables)
    conversations, origins, _, problems = _read_kept(spec, cfg, {})
    refuse_mixed_test(conversations[:limit], origins[:limit], spec)
    cut = slice(None, limit)
    prepared = Prepared({}, problems_before(problems, origins, limit), Counter(), Counter())
    split = _encode_split("test", conversations[cut], origins[cut], tokenizer, cfg, prepared)
    if not split.encoded:
        first = f"; first problem: {prepared.problems[0]}" if prepared.problems else " (an empty file?)"
        raise UserError(f"{spec}: no example to evaluate{first}")
    for line in skipped_lines(prepared.problems):
        say(line)
    return split


def _prepare(cfg: DataConfig, tokenizer, out_dir: Path | None) -> Prepared:
    problems: list[Problem] = []
    formats: Counter = Counter()
    raw: dict[str, tuple[list, list]] = {}  # split -> (conversations, origins)
    weights: list[float] = []  # per training example
    held_out = False
    if cfg.train == "demo":
        from .demo import make_splits

        for name, rows in make_splits(cfg.demo_size, cfg.seed).items():
            raw[name] = ([r["messages"] for r in rows], [(f"demo:{name}", i) for i in range(1, len(rows) + 1)])
        formats["messages"] = len(raw["train"][0])
        if out_dir is not None:
            write_demo_files({name: conversations for name, (conversations, _) in raw.items()}, out_dir)
        weights = [1.0] * len(raw["train"][0])
    else:
        seen: dict = {}
        read = 0  # every training record read, usable or not (not those of validation and test)
        for name, spec in [("train", cfg.train), *[(f"mix:{s}", s) for s in cfg.mix],
                           *[(n, getattr(cfg, n)) for n in ("validation", "test") if getattr(cfg, n)]]:
            # Duplicates are found within the training sources, and within each eval source.
            training = "data.train" if name == "train" else "data.mix" if name.startswith("mix:") else None
            conversations, origins, found_formats, found = _read_kept(spec, cfg, seen if training else {}, training)
            problems += found
            formats += found_formats
            target = "train" if name.startswith("mix:") else name
            before = raw.get(target, ([], []))
            raw[target] = (before[0] + conversations, before[1] + origins)
            if target == "train":
                weights += [cfg.mix.get(spec, 1.0) if name != "train" else 1.0] * len(conversations)
                read += len(conversations) + len(found)
        if cfg.dedup == "near":
            from .near_dup import remove

            keep, near = remove(raw["train"], {n: raw[n] for n in ("validation", "test") if n in raw},
                                cfg.near_dup_threshold)
            problems += near
            raw["train"] = ([raw["train"][0][i] for i in keep], [raw["train"][1][i] for i in keep])
            weights = [weights[i] for i in keep]
        if "test" in raw:
            refuse_mixed_test(*raw["test"], cfg.test)
        if not raw["train"][0]:
            if not problems:
                raise UserError(f"{cfg.train}: no training records in it (an empty file?)")
            raise UserError(f"{cfg.train}: no usable training examples {unusable(problems)}")
        if "validation" not in raw:
            raw["train"], raw["validation"], weights = _hold_out(raw["train"], weights, cfg)
            held_out = True
    raw["train"] = _mix(raw["train"], weights, cfg.seed)
    prepared = Prepared({}, problems, Counter(), formats)
    prepared.records = len(raw["train"][0]) if cfg.train == "demo" else read
    for name, (conversations, origins) in raw.items():
        prepared.splits[name] = _encode_split(name, conversations, origins, tokenizer, cfg, prepared)
    train = prepared.splits["train"]
    for name in ("validation", "test"):
        if name not in prepared.splits or cfg.train == "demo":
            continue
        if held_out and cfg.dedup and name == "validation":
            prepared.overlap[name] = []  # held out of deduplicated train: no overlap by construction
        else:
            prepared.overlap[name] = overlap(train.conversations, prepared.splits[name].conversations,
                                             prepared.splits[name].origins)
    prepared.dropped = Counter(p.kind for p in prepared.problems)
    if not train or not sum(e.label_count for e in train.encoded):
        masked = prepared.dropped.get("no answer tokens", 0)
        why = (f" ({masked} had no answer token left after masking: data.reasoning={cfg.reasoning}, "
               f"data.train_on_inputs={cfg.train_on_inputs}, chat template {prepared.template or 'as set'})" if masked else "")
        hint = length_hint(prepared, cfg) if prepared.too_long else None
        dropped = ", ".join(f"{kind}: {count}" for kind, count in prepared.dropped.items())
        first = min(prepared.problems, key=lambda p: place(p.file, p.line), default=None)
        raise UserError(f"{cfg.train}: no training example has an answer token to learn from; every training "
                        f"example was dropped ({dropped}){why}" + (f"; {hint_line(hint)}" if hint else "")
                        + (f"; first: {first}" if first else ""))
    # Records that survived every check, counting those held out for validation. A raw-text document
    # is used whole, though a row names only the document it starts in.
    def used(name):
        conversations, origins = raw[name]
        texts = {o for c, o in zip(conversations, origins) if c[0]["role"] == "text"}
        return len(set(prepared.splits[name].origins) | texts)

    usable = used("train") + (used("validation") if held_out else 0)
    if cfg.min_valid_share and usable < cfg.min_valid_share * max(1, prepared.records):
        raise UserError(f"{cfg.train}: only {usable} of {prepared.records} training records are usable, fewer than "
                        f"data.min_valid_share={cfg.min_valid_share}" + "".join(f"; first problem: {p}" for p in prepared.problems[:1]))
    return prepared


def _hold_out(train, weights, cfg):
    """A seeded validation share of the (deduplicated) training examples."""
    conversations, origins = train
    order = list(range(len(conversations)))
    random.Random(cfg.seed).shuffle(order)
    cut = max(1, int(len(order) * cfg.validation_share)) if len(order) > 1 else 0
    held, kept = sorted(order[:cut]), sorted(order[cut:])
    pick = lambda idx: ([conversations[i] for i in idx], [origins[i] for i in idx])  # noqa: E731
    return pick(kept), pick(held), [weights[i] for i in kept]


def _mix(train, weights, seed):
    """Weight w: each example is kept int(w) times, plus once more with probability w - int(w) (seeded)."""
    if all(w == 1.0 for w in weights):
        return train
    rng = random.Random(seed + 1)
    conversations, origins = [], []
    for messages, origin, weight in zip(*train, weights):
        copies = int(weight) + (rng.random() < weight - int(weight))
        conversations += [messages] * copies
        origins += [origin] * copies
    return conversations, origins


def _encode_split(name, conversations, origins, tokenizer, cfg: DataConfig, prepared: Prepared) -> Split:
    split = Split(name)
    chats = [i for i, m in enumerate(conversations) if m[0]["role"] != "text"]
    texts = [i for i, m in enumerate(conversations) if m[0]["role"] == "text"]
    results = encode_many(tokenizer, [conversations[i] for i in chats], cfg.train_on_inputs, cfg.reasoning)
    for index, result in zip(chats, results):
        file, line = origins[index]
        if isinstance(result, TemplateError):
            prepared.problems.append(Problem(file, line, result.reason(), result.kind))
            continue
        # Several examples where the template renders each answer's history its own way (see turn_examples).
        answers = [i + 1 for i, m in enumerate(conversations[index]) if m["role"] == "assistant"]
        for encoded in result if answers else []:
            ends_at = encoded.ends_at or answers[-1]
            # Test examples are scored whole, as `compare` scores a file: dropping the long ones
            # would leave a test set of short answers.
            encoded = (answered(encoded, file, line, prepared) if name == "test"
                       else length_policy(encoded, cfg, file, line, prepared))
            if encoded is not None:
                split.conversations.append(conversations[index][:ends_at])
                split.encoded.append(encoded)
                split.origins.append((file, line))
    documents = [conversations[i][0]["content"] for i in texts]
    if texts and name == "test":  # scored document by document, each whole (eval/compare.py text_losses)
        for index, encoded in zip(texts, encode_documents(tokenizer, documents)):
            split.conversations.append(conversations[index])
            split.encoded.append(encoded)
            split.origins.append(origins[index])
    elif texts:
        for document, row in encode_text(tokenizer, documents, cfg.max_seq_len):
            split.conversations.append([{"role": "text", "content": tokenizer.decode(row.input_ids)}])
            split.encoded.append(row)
            split.origins.append(origins[texts[document]])
    return split


def length_policy(encoded: Encoded, cfg: DataConfig, file: str, line: int, prepared: Prepared) -> Encoded | None:
    """Drop, truncate or refuse an over-long example; drop one with no answer token left."""
    length = len(encoded.input_ids)
    if length > cfg.max_seq_len:
        prepared.too_long.append([length, next((i for i, t in enumerate(encoded.labels) if t != IGNORE), -1)])
        if cfg.overlong == "error":
            raise UserError(f"{file}:{line}: example has {length} tokens, more than data.max_seq_len={cfg.max_seq_len} "
                            "(set data.overlong to 'drop' or 'truncate')")
        if cfg.overlong == "drop":
            prepared.problems.append(Problem(file, line, f"longer than max_seq_len ({length} > {cfg.max_seq_len} tokens)"))
            return None
        encoded = Encoded(encoded.input_ids[: cfg.max_seq_len], encoded.labels[: cfg.max_seq_len])
        if encoded.label_count == 0:
            prepared.problems.append(Problem(file, line, f"answer cut away by truncation ({length} tokens)"))
            return None
        prepared.truncated += 1
    return answered(encoded, file, line, prepared)


def answered(encoded: Encoded, file: str, line: int, prepared: Prepared) -> Encoded | None:
    """The example, or None (counted) where it has no answer token to learn from or score."""
    if encoded.label_count == 0:
        prepared.problems.append(Problem(file, line, "no answer tokens (all masked)", "no answer tokens"))
        return None
    return encoded


def _cache_key(cfg: DataConfig, sources: dict, tokenizer) -> str | None:
    if not cfg.cache or cfg.train == "demo" or any(is_hub_id(s) for s in sources.values()):
        return None
    for name, spec in sources.items():
        check_source(spec, f"data.{name}")
    files = [f for spec in sources.values() for f in source_files(spec)]
    folder = cache.tokenizer_folder(tokenizer)
    spec = folder or (tokenizer if isinstance(tokenizer, str) else cache.vocabulary_hash(tokenizer))
    settings = cfg.model_dump(mode="json", exclude={"cache"})
    settings["chat_template"] = cache.template_for_key(cfg.chat_template, tokenizer, folder)
    return cache.data_key(settings, files, spec, folder)


def _to_cache(prepared: Prepared, tokenizer) -> tuple[dict, dict]:
    import numpy as np

    meta = {
        "tokenizer_stamps": cache.tokenizer_stamps(getattr(tokenizer, "name_or_path", None)),
        "problems": [[p.file, p.line, p.reason, p.kind] for p in prepared.problems],
        "formats": dict(prepared.formats), "records": prepared.records, "template": prepared.template,
        "overlap": prepared.overlap, "truncated": prepared.truncated, "too_long": prepared.too_long,
        "splits": {name: {"conversations": s.conversations, "origins": s.origins} for name, s in prepared.splits.items()},
    }
    arrays = {}
    for name, split in prepared.splits.items():
        arrays[f"{name}.ids"] = np.array([t for e in split.encoded for t in e.input_ids], dtype=np.int32)
        arrays[f"{name}.labels"] = np.array([t for e in split.encoded for t in e.labels], dtype=np.int32)
        arrays[f"{name}.lengths"] = np.array([len(e.input_ids) for e in split.encoded], dtype=np.int64)
    return meta, arrays


def _from_cache(meta: dict, arrays: dict) -> Prepared:
    import numpy as np

    problems = [Problem(*p) for p in meta["problems"]]
    prepared = Prepared({}, problems, Counter(p.kind for p in problems), Counter(meta["formats"]), meta["records"],
                        meta["template"], meta["overlap"], meta["truncated"], meta["too_long"], cached=True)
    for name, stored in meta["splits"].items():
        ids, labels = arrays[f"{name}.ids"].tolist(), arrays[f"{name}.labels"].tolist()
        ends = np.cumsum(arrays[f"{name}.lengths"]).tolist()
        starts = [0] + ends[:-1]
        encoded = [Encoded(ids[a:b], labels[a:b]) for a, b in zip(starts, ends)]
        prepared.splits[name] = Split(name, stored["conversations"], encoded, [tuple(o) for o in stored["origins"]])
    return prepared


def write_demo_files(raw: dict[str, list[list[dict]]], out_dir: Path) -> None:
    """The generated demo data, saved so users can look at it and reuse it."""
    folder = out_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name, conversations in raw.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as out:
            for messages in conversations:
                out.write(json.dumps({"messages": messages}) + "\n")


__all__ = ["IGNORE", "Prepared", "Split", "load_conversations", "prepare", "write_demo_files"]
