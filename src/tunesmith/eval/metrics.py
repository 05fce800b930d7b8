"""Scoring generated answers against references."""
from __future__ import annotations

import json
import re


def parse_json_object(text: str) -> dict | None:
    """The first JSON object in the text (models sometimes wrap it in prose or code fences)."""
    start = text.find("{")
    while start >= 0:
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                try:
                    value = json.loads(text[start:end + 1])
                except json.JSONDecodeError:
                    break
                return value if isinstance(value, dict) else None
        start = text.find("{", start + 1)
    return None


def json_field_scores(predictions: list[str], references: list[str], fields: list[str] | None = None) -> dict:
    """JSON validity, accuracy of each field, and the share with every field right."""
    n = len(references)
    valid, all_right = 0, 0
    per_field: dict[str, int] = {}
    for prediction, reference in zip(predictions, references):
        expected = json.loads(reference)
        keys = fields or list(expected)
        got = parse_json_object(prediction)
        if got is None:
            continue
        valid += 1
        right = [k for k in keys if k in got and got[k] == expected.get(k)]
        for key in right:
            per_field[key] = per_field.get(key, 0) + 1
        all_right += len(right) == len(keys)
    keys = fields or (list(json.loads(references[0])) if references else [])
    return {
        "json_valid": valid / n if n else 0.0,
        "all_fields": all_right / n if n else 0.0,
        **{f"field/{k}": per_field.get(k, 0) / n if n else 0.0 for k in keys},
    }


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(1, len(references))
