"""Checks across examples: duplicates (exact and normalised text), train/eval overlap, drop reports."""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

from ..errors import UserError, counted
from .records import place
from .sources import Problem
from .tools import call_text

_NON_WORD = re.compile(r"[\W_]+")


def message_text(message: dict) -> str:
    """Everything a message says: its content, reasoning, tool calls (and a record's declared tools)."""
    parts = [message.get("reasoning_content") or "", message["content"]]
    parts += [call_text(call) for call in message.get("tool_calls") or []]
    if message.get("tools"):
        parts.append(json.dumps(message["tools"], sort_keys=True))
    return "\x1e".join(parts) if len(parts) > 2 or parts[0] else message["content"]


def exact_key(messages: list[dict]) -> tuple:
    return tuple((m["role"], message_text(m)) for m in messages)


def normalised_key(messages: list[dict]) -> str:
    """Case, punctuation and white space do not make two examples different."""
    return "\x1f".join(_NON_WORD.sub(" ", message_text(m).lower()).strip() for m in messages)


def deduplicate(conversations: list[list[dict]], origins: list[tuple[str, int]], seen: dict | None = None
                ) -> tuple[list[int], list[Problem], Counter]:
    """Indices to keep (first occurrence wins), a Problem per removed duplicate, and counts by kind."""
    seen = {} if seen is None else seen  # the caller's, shared across its sources (an empty one too)
    seen_exact, seen_norm = seen.setdefault("exact", {}), seen.setdefault("normalised", {})
    keep, problems, counts = [], [], Counter()
    for index, messages in enumerate(conversations):
        exact, norm = exact_key(messages), normalised_key(messages)
        first = seen_exact.get(exact)
        kind = "duplicate (exact)" if first else "duplicate (normalised text)" if norm in seen_norm else None
        if kind:
            first = first or seen_norm[norm]
            file, line = origins[index]
            problems.append(Problem(file, line, f"{kind} of {first[0]}:{first[1]}", kind))
            counts[kind] += 1
            continue
        seen_exact[exact] = seen_norm[norm] = origins[index]
        keep.append(index)
    return keep, problems, counts


def overlap(train: list[list[dict]], other: list[list[dict]], origins: list[tuple[str, int]]) -> list[str]:
    """'file:line' of each example of `other` whose normalised text is also in train."""
    known = {normalised_key(m) for m in train}
    return [f"{f}:{l}" for m, (f, l) in zip(other, origins) if normalised_key(m) in known]


def skipped_lines(problems: list[Problem]) -> list[str]:
    """What `eval` and `compare` say of the records they leave out, as `data check` says it."""
    if not problems:
        return []
    return [f"skipped {counted(len(problems), 'record')} that cannot be scored:"] + drop_lines(drop_report(problems))


def problems_before(problems: list[Problem], origins: list[tuple[str, int]], limit: int | None) -> list[Problem]:
    """The problems among the records read up to the `limit`-th usable one (eval and compare's
    --limit): the records past it are never scored, so what is wrong with them is not said."""
    if not limit or len(origins) <= limit:
        return problems
    last = place(*origins[limit - 1])
    return [p for p in problems if place(p.file, p.line) <= last]  # files are read in sorted order


def drop_lines(groups: dict[str, dict]) -> list[str]:
    """A drop_report as lines: each kind with its count, its first places and the first one whole."""
    lines = []
    for kind, info in groups.items():
        lines.append(f"  {kind}: {info['count']} (first: {', '.join(info['first'])})")
        if info.get("example"):  # a data check's report.json of before 2026-12-07 has none
            lines.append(f"    e.g. {info['example']}")
    return lines


def drop_report(problems: list[Problem], first: int = 3) -> dict[str, dict]:
    """{kind: {count, first: ['file:line', ...], example: 'file:line: reason'}}, most frequent first;
    each kind's places in file order, its example the first of them with its whole reason (the kind
    alone does not say which role was misspelt, or which field is missing)."""
    grouped: dict[str, list[Problem]] = defaultdict(list)
    for problem in problems:
        grouped[problem.kind].append(problem)
    ordered = sorted(grouped.items(), key=lambda item: -len(item[1]))
    report = {}
    for kind, items in ordered:
        items = sorted(items, key=lambda p: place(p.file, p.line))
        report[kind] = {"count": len(items), "first": [f"{p.file}:{p.line}" for p in items[:first]],
                        "example": str(items[0])}
    return report


def unusable(problems: list[Problem], kinds: int = 3) -> str:
    """Why no record was usable, for that error: the count, then the first problem of each of the
    commonest kinds (drop_report's) with how many there are of it. The first problem alone could be
    one broken line where 39 others lacked a field."""
    report = list(drop_report(problems, first=0).values())
    shown = [r["example"] + (f" ({r['count']} like it)" if r["count"] > 1 else "") for r in report[:kinds]]
    others = f"; {len(report) - kinds} other kinds" if len(report) > kinds else ""
    return f"({counted(len(problems), 'problem')})" + (": " + "; ".join(shown) + others if shown else "")


def refuse_mixed_test(conversations: list[list[dict]], origins: list[tuple[str, int]], spec: str) -> None:
    """Test data is scored one way: by generated answers, or raw text by its loss; a file of both
    was refused only after the run folder was made, naming no record."""
    text = next((o for c, o in zip(conversations, origins) if c and c[0]["role"] == "text"), None)
    chat = next((o for c, o in zip(conversations, origins) if c and c[0]["role"] != "text"), None)
    if text and chat:
        raise UserError(f"{spec}: test data mixes raw text records (first: {text[0]}:{text[1]}) with conversations "
                        f"(first: {chat[0]}:{chat[1]}); they are scored apart (answers generated, or the loss on the "
                        "text): give them as two files")
