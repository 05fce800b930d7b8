"""Tool calling and reasoning in chat records: checked, normalised to the form chat templates read.

A record may declare `tools` (OpenAI / transformers style: `{"type": "function", "function": {"name",
"description", "parameters": JSON schema}}`, or the bare function object). Assistant messages may hold
`tool_calls` (`{"id", "type": "function", "function": {"name", "arguments"}}`, arguments an object or a
JSON string) and `reasoning_content`; `tool` messages carry a call's result. Each tool call is checked
against the declared schemas: an unknown function, a missing required argument or arguments that are
not a JSON object, or arguments unlike the schema (a type, an enum: checked with jsonschema) make the
record a FormatError (reported with file, line and reason, and left out).

The declared tools travel with the conversation as a first pseudo-message of role `tools`, so a
conversation stays a list of messages everywhere (cache, splits, evaluation); `split_tools` takes it
off before a template renders the messages with `tools=`.
"""
from __future__ import annotations

import functools
import json

TOOLS_ROLE = "tools"


class FormatError(ValueError):
    """A record that does not fit its format; `kind` groups the reasons for the counts."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def tools_message(tools: list[dict]) -> dict:
    """The pseudo-message that carries a conversation's declared tools, first (`split_tools` takes it off)."""
    return {"role": TOOLS_ROLE, "content": "", "tools": tools}


def split_tools(messages: list[dict]) -> tuple[list[dict] | None, list[dict]]:
    """(declared tools or None, the messages a template renders)."""
    if messages and messages[0]["role"] == TOOLS_ROLE:
        return messages[0]["tools"], messages[1:]
    return None, messages


def checked_tools(tools) -> list[dict]:
    """The declared tools as `{"type": "function", "function": {...}}`, each with a name."""
    if not isinstance(tools, list):
        raise FormatError("wrong type", f"'tools' must be a list, got {type(tools).__name__}")
    out = []
    for index, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise FormatError("wrong type", f"tools[{index}] has no function name")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict):
            raise FormatError("wrong type", f"tools[{index}].parameters must be a JSON schema object")
        out.append({"type": "function", "function": function})
    return out


TEXT_PARTS = ("text", "input_text", "output_text")  # Chat Completions' type, then the Responses API's


def joined_parts(content, where: str):
    """OpenAI-style content parts ([{"type": "text", "text": ...}, ...]) as one text, the parts end to end
    as chat templates that read parts render them; anything else as it is. A part that is not text
    (an image, audio) is refused: training here is text only."""
    if not isinstance(content, list):
        return content
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise FormatError("not text", f"{where}[{index}] is {kind!r}, not a text part; training is text only")
        texts.append(part["text"])
    return "".join(texts)


def refuse_null(mapping: dict, key: str, where: str) -> None:
    """A text given as JSON null is there, but empty: refused as empty text, not as a missing field."""
    if key in mapping and mapping[key] is None:
        raise FormatError("empty text", f"{where} is null")


def checked_message(turn: dict, role: str, where: str, text_key: str, checked_text) -> dict:
    """One message in the form templates read; tool calls normalised, arguments parsed, content parts
    joined; an assistant message's `weight: 0` (OpenAI's fine-tuning format) kept: no loss on it."""
    if isinstance(turn.get(text_key), list) and role != "tool":
        turn = {**turn, text_key: joined_parts(turn[text_key], f"{where}.{text_key}")}
    calls = turn.get("tool_calls") if role == "assistant" else None
    message = {"role": role}
    if role == "assistant" and turn.get("weight") is not None:  # null: a column Arrow filled for other rows
        if turn["weight"] not in (0, 1) or isinstance(turn["weight"], bool):
            raise FormatError("wrong type", f"{where}.weight must be 0 or 1, got {turn['weight']!r}")
        if turn["weight"] == 0:
            message["weight"] = 0
    if calls:
        if not isinstance(calls, list):
            raise FormatError("wrong type", f"{where}.tool_calls must be a list")
        content = turn.get(text_key)
        if content is not None and not isinstance(content, str):
            raise FormatError("wrong type", f"{where}.{text_key} must be text, got {type(content).__name__}")
        message["content"] = content or ""
        message["tool_calls"] = [_checked_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)]
    elif role == "tool" and isinstance(turn.get(text_key), (dict, list)):
        message["content"] = json.dumps(turn[text_key], ensure_ascii=False)
    else:
        refuse_null(turn, text_key, f"{where}.{text_key}")
        message["content"] = checked_text(turn.get(text_key), f"{where}.{text_key}")
    if role == "assistant" and turn.get("reasoning_content") is not None:
        reasoning = turn["reasoning_content"]
        if not isinstance(reasoning, str):
            raise FormatError("wrong type", f"{where}.reasoning_content must be text, got {type(reasoning).__name__}")
        message["reasoning_content"] = checked_text(reasoning, f"{where}.reasoning_content") if reasoning.strip() \
            else reasoning
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(turn.get(key), str):
                message[key] = turn[key]
    return message


def _checked_call(call, where: str) -> dict:
    if not isinstance(call, dict):
        raise FormatError("wrong type", f"{where} is not an object")
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise FormatError("wrong type", f"{where} has no function name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise FormatError("tool call: arguments not valid JSON", f"{where} ({name}): {err.msg} at {err.pos}") from None
    if not isinstance(arguments, dict):
        raise FormatError("tool call: arguments not valid JSON", f"{where} ({name}): arguments must be a JSON object, "
                          f"got {type(arguments).__name__}")
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def check_calls(messages: list[dict], tools: list[dict] | None) -> None:
    """Every tool call names a declared function, with arguments that fit its schema."""
    for index, message in enumerate(messages):
        for number, call in enumerate(message.get("tool_calls") or []):
            found = call_problem(call["function"]["name"], call["function"]["arguments"], tools)
            if found:
                raise FormatError(found[0], f"messages[{index}].tool_calls[{number}] {found[1]}")


def call_problem(name: str, arguments, tools: list[dict] | None) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with a call of `name` against the declared tools, or None."""
    declared = {t["function"]["name"]: t["function"] for t in tools or []}
    if name not in declared:
        known = ", ".join(sorted(declared)) or "none declared in the record's 'tools'"
        return "tool call: unknown function", f"calls '{name}' (known: {known})"
    if not isinstance(arguments, dict):
        return "tool call: arguments not valid JSON", f"calls '{name}' with arguments that are not a JSON object"
    parameters = declared[name].get("parameters") or {}
    missing = [key for key in parameters.get("required") or [] if key not in arguments]
    if missing:
        return "tool call: missing required argument", f"calls '{name}' without {', '.join(repr(k) for k in missing)}"
    problem = argument_problem(arguments, parameters)
    return ("tool call: arguments unlike the schema", f"calls '{name}' with {problem}") if problem else None


def argument_problem(arguments, parameters: dict | None) -> str | None:
    """Why a call's arguments do not fit its function's JSON schema (a type, an enum, an argument the
    schema does not allow, a required one missing), or None; a schema that is not valid JSON Schema
    (`"type": "int"`, as some data sets write) or that refers to what it does not hold (`$ref` to
    another document: never fetched) is not held against the call."""
    from jsonschema.exceptions import best_match
    from referencing.exceptions import Unresolvable

    try:
        validator = _validator(json.dumps(parameters, sort_keys=True)) if parameters else None
        error = best_match(validator.iter_errors(arguments)) if validator else None
    except (Unresolvable, RecursionError):  # `$ref` to nowhere, or to itself without end (`{"$ref": "#"}`)
        return None
    if error is None:
        return None
    path = "".join(f"[{part!r}]" for part in error.absolute_path)
    return f"arguments{path}: {error.message}"


@functools.lru_cache(maxsize=256)
def _validator(schema: str):
    """One validator per schema (a data set repeats its tools on every record), or None for a schema
    that is not JSON Schema. Its registry is empty: a `$ref` to a URL is not fetched. Regular
    expressions are not matched (`pattern`, `patternProperties`, and the properties these would
    leave out of `additionalProperties`): one written like `^(a+)+$` takes hours on a 40-character
    argument, and Python's `re` cannot be stopped."""
    from jsonschema import Draft202012Validator, SchemaError, validators
    from referencing import Registry

    parameters = json.loads(schema)
    try:
        Draft202012Validator.check_schema(parameters)
    except (SchemaError, RecursionError):
        return None
    keywords = {"pattern": _not_checked, "patternProperties": _not_checked,
                "additionalProperties": _additional_unless_patterned}
    if '"patternProperties"' in schema:  # anywhere: unevaluatedProperties looks through $ref and allOf
        keywords["unevaluatedProperties"] = _not_checked
    return validators.extend(Draft202012Validator, keywords)(parameters, registry=Registry())


def _not_checked(validator, value, instance, schema):
    return iter(())


def _additional_unless_patterned(validator, value, instance, schema):
    """additionalProperties as JSON Schema says, but not beside patternProperties (which would decide
    which properties it covers, by matching their names)."""
    from jsonschema import Draft202012Validator

    if "patternProperties" not in schema:
        yield from Draft202012Validator.VALIDATORS["additionalProperties"](validator, value, instance, schema)


def call_text(call: dict) -> str:
    """A tool call as canonical JSON ({"name", "arguments"}), for keys and metrics."""
    return json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]},
                      sort_keys=True, ensure_ascii=False)
