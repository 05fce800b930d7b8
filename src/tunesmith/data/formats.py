"""Turn records of the common data formats into chat messages (or raw text documents).

Formats: chat `messages` (role / content), ShareGPT `conversations` (from / value), instruction
(instruction / input / output), prompt / completion, question / answer, and raw `text` for
continued pre-training. Each record's format is detected from its keys unless the config names one.

Chat messages may carry tool calling and reasoning (see tools.py): a record's `tools` (JSON schemas),
assistant `tool_calls`, `tool` messages with results, and assistant `reasoning_content`.
"""
from __future__ import annotations

import difflib
import math

from ..errors import UserError
from .tools import FormatError, TOOLS_ROLE, checked_message, checked_tools, check_calls, refuse_null, tools_message

ROLES = {"system", "user", "assistant", "tool"}
# Roles as the common sources spell them: OpenAI's `developer` (its system), Gemini's `model`,
# ShareGPT's `human` / `gpt` (and the chatgpt / bing / bard of its crawls), `bot`.
ALIASES = {"developer": "system", "human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}
MESSAGE_ROLES = {**{role: role for role in ROLES}, **ALIASES}
SHAREGPT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", **ALIASES,
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
FORMATS = ("messages", "sharegpt", "instruction", "prompt_completion", "question_answer", "text")
# The keys each format needs: detection tries them in this order.
REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "question_answer": ("question", "answer"),
    "text": ("text",),
}


# Every top-level field a reader looks for (SFT formats, tool calls, preference and prompt records).
FIELDS = frozenset({"messages", "conversations", "instruction", "input", "output", "prompt", "completion",
                    "question", "answer", "text", "tools", "chosen", "rejected", "label", "reference",
                    "system", "system_prompt"})
SPELLED = FIELDS | {"response", "context", "conversation"}  # read in any case, with spaces around
PAIRS, UNPAIRED, PROMPTS = "pairs", "unpaired", "prompts"  # the data kinds of the other objectives
# Columns beside a raw `text` that are metadata, not text to learn (FineWeb's id, url, dump, date,
# file_path, language; Wikipedia's title; RedPajama's and the Pile's meta; Dolma's source, added, created)
TEXT_METADATA = frozenset({"id", "url", "title", "source", "meta", "metadata", "date", "timestamp", "created",
                           "added", "language", "lang", "dump", "file_path", "domain", "license"})


def rename_columns(record: dict, columns: dict[str, str]) -> dict:
    """The record with the user's column names mapped to the format's field names ({field: column}),
    then the common spellings of the fields (canonical_fields). Every column is taken from the record
    as it was, so two columns can swap names ({question: answer, answer: question}). A column named
    in another case or with spaces around (a header 'Q ,A') is found too, where only one matches."""
    if columns:
        found = {field: _column(record, column) for field, column in columns.items()}
        moved = {field: record[key] for field, key in found.items() if key is not None}
        kept = {key: value for key, value in record.items() if key not in found.values()}
        record = {**kept, **moved}
    return canonical_fields(record)


def _column(record: dict, column: str):
    if column in record:
        return column
    loose = [key for key in record if isinstance(key, str) and key.strip().lower() == column.strip().lower()]
    return loose[0] if len(loose) == 1 else None


def canonical_fields(record: dict) -> dict:
    """Field names as spreadsheets and public data sets often spell them: a column "Question" or
    " answer " is read as `question` / `answer` where the exact field is absent, and `response`
    is the answer of an `instruction` (Dolly's instruction / context / response) or of a `prompt`;
    `conversation` is ShareGPT's `conversations`."""
    out: dict = {}
    for key, value in record.items():
        name = key.strip().lower() if isinstance(key, str) else key
        if name not in SPELLED or (name != key and (name in record or name in out)):
            name = key  # not a field, or the exact field (or an earlier spelling of it) is there
        out[name] = value
    if "conversation" in out and "conversations" not in out and "messages" not in out:
        out["conversations"] = out.pop("conversation")
    if "response" in out and not {"output", "completion"} & out.keys():
        if "instruction" in out:
            out["output"] = out.pop("response")
            if "context" in out and "input" not in out:
                out["input"] = out.pop("context")
        elif "prompt" in out:
            out["completion"] = out.pop("response")
    return out


def detect_format(record: dict) -> str:
    for kind, keys in REQUIRED.items():
        if all(k in record for k in keys):
            if kind == "text":
                _refuse_other_text(record)
            return kind
    for kind, keys in REQUIRED.items():  # half a format: name the field that is missing
        if any(k in record for k in keys):
            missing = next(k for k in keys if k not in record)
            grpo = ("; {prompt, reference} records are GRPO prompts: train.objective: grpo, "
                    "data check --objective grpo") if kind == "prompt_completion" and "reference" in record else ""
            raise FormatError("missing field", f"'{missing}' (the record looks like format {kind}{grpo})"
                              f"{_spelling_hint(record, missing)}")
    named = [key for key in record if isinstance(key, str)]
    named = [key for key in named if key.strip().lower() not in TEXT_METADATA] if len(named) > 2 else named
    # The user's own column names in the override they can paste (the first two, in the file's order,
    # an id or url column passed over)
    example = f" (e.g. data.columns={{question: {named[0]}, answer: {named[1]}}})" if len(named) >= 2 else ""
    raise FormatError("unknown format", f"no known fields (keys: {', '.join(sorted(map(str, record))) or 'none'}); "
                      f"map your columns with data.columns{example}, or set data.format")


def _refuse_other_text(record: dict) -> None:
    """A raw `text` record with another column of text (`text,summary`, `text,label`: a summarisation
    or classification sheet) is refused: read as raw text, that column was dropped without a word.
    Numbers, empty cells, non-text values and the metadata of pre-training corpora go with raw text."""
    others = [key for key, value in record.items() if key != "text" and isinstance(value, str) and value.strip()
              and not _number(value) and str(key).strip().lower() not in TEXT_METADATA]
    if others:
        asked = others[0].strip().lower() in ("question", "prompt", "instruction", "input")
        pair = f"question: {others[0]}, answer: text" if asked else f"question: text, answer: {others[0]}"
        raise FormatError("text beside other columns", f"field 'text' (raw text: only 'text' would be read) beside "
                          f"other text in {', '.join(map(repr, others))}; map the columns, e.g. data.columns={{{pair}}}, "
                          "or set data.format: text to train on 'text' alone")


def _number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def record_kind(record: dict) -> str | None:
    """pairs, unpaired (KTO) or prompts (GRPO) from a record's fields; None for anything else (SFT data).
    An SFT record with a column named like a preference field (a `Rejected` status) stays SFT: only
    `chosen`, or `rejected` where no SFT format fits, makes a pair. A `completion` with a `label` is
    KTO data whatever the label holds: a CSV's labels are text ("true", "0"), and one that is null or
    unreadable is a problem for KTO to name, not a reason to imitate the answer as SFT data."""
    if "chosen" in record or ("rejected" in record and not _sft_format(record)):
        return PAIRS
    if "label" in record and "completion" in record:
        return UNPAIRED
    if "prompt" in record and not {"completion", "response", "output"} & set(record):
        return PROMPTS
    return None


def _sft_format(record: dict) -> bool:
    try:
        return detect_format(record) != "text"
    except FormatError:
        return False


def _refuse_preference(record: dict) -> None:
    """A pair or KTO record read as SFT data (train.objective left at sft, or grpo): a KTO file was
    trained on whole, its thumbs-down answers imitated like the others, without a word."""
    kind = record_kind(record)
    if kind == PAIRS:
        raise FormatError("preference pair", "chosen / rejected answers are pair data: train.objective: dpo (or orpo, "
                                             "simpo); data check --objective dpo")
    if kind == UNPAIRED:
        raise FormatError("KTO record", "a completion with a label is KTO data: train.objective: kto (as SFT "
                                        "data its false-labelled answers would be imitated; data.format: "
                                        "prompt_completion reads them so all the same, the label ignored)")


def _spelling_hint(record: dict, missing: str) -> str:
    """The override to paste where one of the record's own columns looks like the missing field
    misspelt ("anwser"): such a file is otherwise refused with no word on which column was meant."""
    own = [key for key in record if isinstance(key, str) and key.strip().lower() not in SPELLED]
    close = difflib.get_close_matches(missing, [key.strip().lower() for key in own], n=1, cutoff=0.75)
    if not close:
        return ""
    column = next(key for key in own if key.strip().lower() == close[0])
    return f"; did you mean column '{column}'? map it with data.columns={{{missing}: {column}}}"


def to_example(record: dict, fmt: str = "auto", system_prompt: str | None = None) -> tuple[str, list[dict]]:
    """(format, chat messages) of one record, validated: known roles, non-empty text, an assistant turn.

    A raw-text record becomes one pseudo-message with role 'text'.
    """
    if fmt == "auto":
        _refuse_preference(record)
    kind = detect_format(record) if fmt == "auto" else fmt
    missing = [k for k in REQUIRED[kind] if k not in record]
    if missing:
        raise FormatError("missing field", f"'{missing[0]}' (format {kind}){_spelling_hint(record, missing[0])}")
    if kind == "text":
        return kind, [{"role": "text", "content": _text(record, "text")}]
    if kind == "messages":
        messages = _checked_turns(record["messages"], "messages", "role", "content", MESSAGE_ROLES)
        if record.get("tools") is not None:
            tools = checked_tools(record["tools"])
            check_calls(messages, tools)
            messages.insert(0, tools_message(tools))
        else:
            check_calls(messages, None)
    elif kind == "sharegpt":
        turns = record["conversations"]
        # role / content turns under ShareGPT's key (lmsys-chat and others), else from / value
        role_content = isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" not in turns[0] \
            and "role" in turns[0]
        keys = ("role", "content", MESSAGE_ROLES) if role_content else ("from", "value", SHAREGPT_ROLES)
        messages = _checked_turns(turns, "conversations", *keys)
    elif kind == "instruction":
        prompt = _text(record, "instruction")
        extra = _optional_text(record, "input")
        messages = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt},
                    {"role": "assistant", "content": _text(record, "output")}]
    else:
        question, answer = REQUIRED[kind]
        messages = [{"role": "user", "content": _text(record, question)},
                    {"role": "assistant", "content": _text(record, answer)}]
    if not any(m["role"] == "assistant" for m in messages):
        raise FormatError("no assistant turn", "nothing to learn from")
    if messages[-1]["role"] in ("user", "tool"):
        # Trained, its earlier answers would hide a cut-off conversation; as a test record it was
        # scored against that last message as if it were the answer.
        raise FormatError("unanswered last turn", f"the conversation ends with a {messages[-1]['role']} turn after "
                                                  "its last answer (remove that turn, or add its answer)")
    if all(m.get("weight", 1) == 0 for m in messages if m["role"] == "assistant"):
        raise FormatError("no assistant turn", "every assistant turn has weight 0: nothing to learn from")
    return kind, with_system_prompt(with_own_system(record, messages), system_prompt)


def with_own_system(record: dict, messages: list[dict]) -> list[dict]:
    """The messages with the record's own system prompt first (after declared tools): a `system`
    field (LLaMA-Factory's sharegpt and alpaca) or `system_prompt` (OpenOrca, SlimOrca); empty is
    none. One that differs from the conversation's own system turn, or from the other field, is refused."""
    given = {key: _optional_text(record, key) for key in ("system", "system_prompt") if key in record}
    texts = {text for text in given.values() if text}
    if not texts:
        return messages
    if len(texts) > 1:
        raise FormatError("two system prompts", "fields 'system' and 'system_prompt' differ; keep one")
    text, field = texts.pop(), next(key for key, value in given.items() if value)
    turns = {str(m["content"]).strip() for m in messages if m["role"] == "system"}
    if turns - {text.strip()}:
        raise FormatError("two system prompts", f"field '{field}' and a system turn in the conversation differ; "
                                                "keep one")
    head = 1 if messages[0]["role"] == TOOLS_ROLE else 0
    return messages if turns else messages[:head] + [{"role": "system", "content": text}] + messages[head:]


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The messages with the system prompt first (after declared tools), unless they have their own
    or are raw text (no turns to put one before)."""
    head = 1 if messages and messages[0]["role"] == TOOLS_ROLE else 0
    if not system_prompt or (len(messages) > head and messages[head]["role"] in ("system", "text")):
        return messages
    return messages[:head] + [{"role": "system", "content": system_prompt}] + messages[head:]


def to_messages(record: dict, system_prompt: str | None = None) -> list[dict]:
    return to_example(record, "auto", system_prompt)[1]


def _text(record: dict, key: str) -> str:
    refuse_null(record, key, f"field '{key}'")
    return _checked_text(record.get(key), f"field '{key}'")


def blank(value) -> bool:
    """An empty cell however a file holds one: absent (None), NaN (pandas' empty cell) or white space."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _optional_text(record: dict, key: str) -> str:
    """An optional field's text: "" where it is blank; a number (`"input": 0`, a parquet int column)
    as its text, as in every other field."""
    value = record.get(key)
    return "" if blank(value) else _checked_text(value, f"field '{key}'")


def _checked_text(value, where: str) -> str:
    if value is None:
        raise FormatError("missing field", f"{where} is missing")
    if isinstance(value, float) and math.isnan(value):  # a spreadsheet's empty cell, as pandas reads it
        raise FormatError("empty text", f"{where} is empty (NaN)")
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)  # an int column with a gap, as pandas and parquet store it: 4.0 was written 4
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a numeric column (pandas' to_json, a parquet int): the number as text
    if not isinstance(value, str):
        raise FormatError("wrong type", f"{where} must be text, got {type(value).__name__}")
    if not value.strip():
        raise FormatError("empty text", f"{where} is empty")
    return whole_characters(value, where)


def whole_characters(value: str, where: str) -> str:
    """The text, refused where it holds half a character: a lone UTF-16 surrogate (JSON's "\\ud83d"),
    left where scraped text was cut inside an emoji; no tokenizer takes it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise FormatError("broken character", f"{where} holds half of a character ({value[err.start]!r}, a lone "
                                              f"UTF-16 surrogate, at character {err.start + 1}): the text was cut "
                                              "inside an emoji or other character; remove or repair it") from None
    return value


def _checked_turns(turns, field: str, role_key: str, text_key: str, role_map: dict) -> list[dict]:
    if not isinstance(turns, list):
        raise FormatError("wrong type", f"'{field}' must be a list, got {type(turns).__name__}")
    if not turns:
        raise FormatError("empty text", f"'{field}' is an empty list")
    out = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise FormatError("wrong type", f"{field}[{index}] is not an object")
        if role_key not in turn or text_key not in turn:  # "Role" / "Content", as some exports spell them
            turn = {key.strip().lower() if isinstance(key, str) else key: value for key, value in turn.items()}
        if role_key not in turn:
            raise FormatError("missing field", f"{field}[{index}] has no '{role_key}'")
        role = known_role(turn.get(role_key), role_map)
        if role not in role_map:
            raise FormatError("unknown role", f"{role!r} in {field}[{index}] (known: {', '.join(sorted(role_map))})")
        if role_map[role] == "system" and isinstance(turn.get(text_key, ""), (str, type(None))) \
                and not (turn.get(text_key) or "").strip():
            continue  # an empty system turn (ShareGPT exports write one): no system prompt, as an empty `system` field
        out.append(checked_message(turn, role_map[role], f"{field}[{index}]", text_key, _checked_text))
    return out


def known_role(role, roles) -> object:
    """A role as `roles` spell it where it is one in another case or with spaces ('Assistant'), else as given."""
    return role.strip().lower() if isinstance(role, str) and role.strip().lower() in roles else role


def is_raw_text(conversations: list[list[dict]]) -> bool:
    """Raw documents (data.format text): scored by the loss on their text, with nothing to generate."""
    kinds = {c[0]["role"] == "text" for c in conversations if c}
    if len(kinds) > 1:
        raise UserError("the data mixes raw text records with conversations: score them as two files")
    return kinds == {True}
