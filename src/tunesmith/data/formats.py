"""Turn records of the common data formats into chat messages."""
from __future__ import annotations

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class FormatError(ValueError):
    """A record that does not fit its format; the message is the reason shown to the user."""


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "question" in record and "answer" in record:
        return "question_answer"
    raise FormatError(f"unknown record format (keys: {', '.join(sorted(record)) or 'none'})")


def to_messages(record: dict, system_prompt: str | None = None) -> list[dict]:
    """Chat messages of one record, validated: known roles, non-empty text, an assistant turn."""
    kind = detect_format(record)
    if kind == "messages":
        messages = _checked_turns(record["messages"], "messages", "role", "content", {r: r for r in ROLES})
    elif kind == "sharegpt":
        messages = _checked_turns(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    elif kind == "instruction":
        prompt = _text(record, "instruction")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise FormatError("field 'input' must be text")
        messages = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra.strip() else prompt},
                    {"role": "assistant", "content": _text(record, "output")}]
    elif kind == "prompt_completion":
        messages = [{"role": "user", "content": _text(record, "prompt")},
                    {"role": "assistant", "content": _text(record, "completion")}]
    else:
        messages = [{"role": "user", "content": _text(record, "question")},
                    {"role": "assistant", "content": _text(record, "answer")}]
    if not any(m["role"] == "assistant" for m in messages):
        raise FormatError("no assistant turn to learn from")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise FormatError(f"field '{key}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise FormatError(f"field '{key}' is empty")
    return value


def _checked_turns(turns, field: str, role_key: str, text_key: str, role_map: dict) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise FormatError(f"'{field}' must be a non-empty list")
    out = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise FormatError(f"{field}[{index}] is not an object")
        role = turn.get(role_key)
        if role not in role_map:
            raise FormatError(f"{field}[{index}]: unknown role {role!r}")
        content = turn.get(text_key)
        if not isinstance(content, str) or not content.strip():
            raise FormatError(f"{field}[{index}]: empty or missing '{text_key}'")
        out.append({"role": role_map[role], "content": content})
    return out
