"""From the data config to tokenised train / validation / test splits, with a summary of what was done."""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig
from ..errors import UserError
from .formats import FormatError, to_messages
from .sources import Problem, read_records
from .tokenize import Encoded, encode


@dataclass
class Split:
    name: str
    conversations: list[list[dict]] = field(default_factory=list)
    encoded: list[Encoded] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.encoded)


@dataclass
class Prepared:
    splits: dict[str, Split]
    problems: list[Problem]
    dropped: Counter

    def summary(self) -> dict:
        return {
            "examples": {name: len(s) for name, s in self.splits.items()},
            "tokens": {name: s.tokens for name, s in self.splits.items()},
            "label_tokens": {name: sum(e.label_count for e in s.encoded) for name, s in self.splits.items()},
            "dropped": dict(self.dropped),
            "first_problems": [str(p) for p in self.problems[:5]],
        }


def load_conversations(path: str, system_prompt: str | None) -> tuple[list[list[dict]], list[Problem]]:
    records = read_records(path)
    conversations, problems = [], list(records.problems)
    for line, record in records.rows:
        try:
            conversations.append(to_messages(record, system_prompt))
        except FormatError as err:
            problems.append(Problem(str(path), line, str(err)))
    return conversations, problems


def prepare(cfg: DataConfig, tokenizer, out_dir: Path | None = None) -> Prepared:
    """Read, validate, split and tokenise the data; the demo task is generated here."""
    problems: list[Problem] = []
    if cfg.train == "demo":
        from .demo import make_splits

        raw = {name: [r["messages"] for r in rows] for name, rows in make_splits(cfg.demo_size, cfg.seed).items()}
        if out_dir is not None:
            write_demo_files(raw, out_dir)
    else:
        raw = {}
        for name in ("train", "validation", "test"):
            path = getattr(cfg, name)
            if path:
                raw[name], found = load_conversations(path, cfg.system_prompt)
                problems += found
        if not raw["train"]:
            first = f" First problem: {problems[0]}" if problems else ""
            raise UserError(f"{cfg.train}: no usable training examples ({len(problems)} problems).{first}")
        if "validation" not in raw:
            rng = random.Random(cfg.seed)
            order = list(range(len(raw["train"])))
            rng.shuffle(order)
            cut = max(1, int(len(order) * cfg.validation_share)) if len(order) > 1 else 0
            raw["validation"] = [raw["train"][i] for i in order[:cut]]
            raw["train"] = [raw["train"][i] for i in order[cut:]]
    dropped: Counter = Counter(p.reason.split(" (")[0] for p in problems)
    splits = {}
    for name, conversations in raw.items():
        split = Split(name)
        for messages in conversations:
            try:
                encoded = encode(tokenizer, messages)
            except ValueError as err:
                dropped[f"template: {err}"] += 1
                continue
            if len(encoded.input_ids) > cfg.max_seq_len:
                dropped["longer than max_seq_len"] += 1
                continue
            if encoded.label_count == 0:
                dropped["no answer tokens"] += 1
                continue
            split.conversations.append(messages)
            split.encoded.append(encoded)
        splits[name] = split
    if not splits["train"]:
        raise UserError(f"{cfg.train}: every training example was dropped ({dict(dropped)})")
    return Prepared(splits, problems, dropped)


def write_demo_files(raw: dict[str, list[list[dict]]], out_dir: Path) -> None:
    """The generated demo data, saved so users can look at it and reuse it."""
    folder = out_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name, conversations in raw.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as out:
            for messages in conversations:
                out.write(json.dumps({"messages": messages}) + "\n")
