"""A small interpreter of Go's text/template, the language of Ollama's TEMPLATE, to check an exported
template by rendering it: the subset Ollama's chat templates use (text, `{{-`/`-}}` trimming,
`if`/`else if`/`else`, `range` with `$i, $m :=`, variables, `.Field` / `$.Field` / `$m.Field`, string and
number literals, parenthesised calls, and the functions eq, ne, and, or, not, len, slice, index).
Data are Python dicts and lists; Ollama's message fields are Role, Content, ...
"""
from __future__ import annotations

import re

_ACTION = re.compile(r"{{(-\s)?(.*?)(\s-)?}}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|:=|,|[^\s(),]+)')


class GoTemplateError(ValueError):
    pass


def render(template: str, data: dict) -> str:
    items = _lex(template)
    nodes, rest = _parse(items, 0, ())
    if rest != len(items):
        raise GoTemplateError("unexpected {{ end }}")
    out: list[str] = []
    _run(nodes, {"$": data}, data, out)
    return "".join(out)


def _lex(template: str) -> list:
    """Text pieces and actions, with the trim markers applied to the neighbouring text."""
    items, at = [], 0
    for match in _ACTION.finditer(template):
        items.append(["text", template[at:match.start()]])
        if match.group(1) and items[-1][0] == "text":
            items[-1][1] = items[-1][1].rstrip()
        items.append(["action", match.group(2).strip(), bool(match.group(3))])
        at = match.end()
    items.append(["text", template[at:]])
    for i, item in enumerate(items):
        if item[0] == "action" and item[2] and i + 1 < len(items):
            items[i + 1][1] = items[i + 1][1].lstrip()
    return items


def _parse(items: list, at: int, stops: tuple) -> tuple[list, int]:
    """Nodes up to one of `stops` (an action word: end, else); returns (nodes, index of the stop)."""
    nodes = []
    while at < len(items):
        item = items[at]
        if item[0] == "text":
            nodes.append(("text", item[1]))
            at += 1
            continue
        words = item[1].split(None, 1)
        head = words[0] if words else ""
        if head in stops:
            return nodes, at
        if head in ("if", "range"):
            body, at = _parse(items, at + 1, ("end", "else"))
            branches = [(item[1][len(head):].strip(), body)]
            otherwise: list = []
            while items[at][1].split(None, 1)[0] == "else":
                clause = items[at][1][4:].strip()
                block, at = _parse(items, at + 1, ("end", "else"))
                if clause.startswith("if "):
                    branches.append((clause[3:].strip(), block))
                else:
                    otherwise = block
            nodes.append((head, branches, otherwise))
            at += 1
            continue
        nodes.append(("action", item[1]))
        at += 1
    return nodes, at


def _run(nodes: list, scope: dict, dot, out: list) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            value = _statement(node[1], scope, dot)
            if value is not None:
                out.append(_text(value))
        elif node[0] == "if":
            for condition, body in node[1]:
                if _truth(_pipeline(_tokens(condition), scope, dot)):
                    _run(body, scope, dot, out)
                    break
            else:
                _run(node[2], scope, dot, out)
        else:  # range
            clause, body = node[1][0]
            names, expression = [], clause
            if ":=" in clause:
                left, expression = clause.split(":=", 1)
                names = [n.strip() for n in left.split(",")]
            items = _pipeline(_tokens(expression), scope, dot) or []
            if not items:
                _run(node[2], scope, dot, out)
            for index, item in enumerate(items):  # one scope: `$x = ...` in the body changes the outer $x
                if len(names) == 2:
                    scope[names[0]], scope[names[1]] = index, item
                elif names:
                    scope[names[0]] = item
                _run(body, scope, item, out)


def _statement(text: str, scope: dict, dot):
    assignment = re.match(r"(\$\w+)\s*:?=\s*(.*)", text, re.S)
    if assignment:
        scope[assignment.group(1)] = _pipeline(_tokens(assignment.group(2)), scope, dot)
        return None
    return _pipeline(_tokens(text), scope, dot)


def _tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text) if t.strip()]


def _pipeline(tokens: list[str], scope: dict, dot):
    args, at = [], 0
    while at < len(tokens):
        token = tokens[at]
        if token == "(":
            depth, end = 1, at + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[end], 0)
                end += 1
            args.append(("value", _pipeline(tokens[at + 1:end - 1], scope, dot)))
            at = end
            continue
        args.append(("word", token))
        at += 1
    if not args:
        return None
    kind, first = args[0]
    if kind == "word" and first in FUNCTIONS:
        return FUNCTIONS[first](*[_operand(a, scope, dot) for a in args[1:]])
    if len(args) > 1:
        raise GoTemplateError(f"cannot call {first!r}")
    return _operand(args[0], scope, dot)


def _operand(arg, scope: dict, dot):
    kind, token = arg
    if kind == "value":
        return token
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape")
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token == ".":
        return dot
    if token.startswith("."):
        return _fields(dot, token[1:])
    if token.startswith("$"):
        name, _, path = token.partition(".")
        if name not in scope:
            raise GoTemplateError(f"undefined variable {name}")
        return _fields(scope[name], path) if path else scope[name]
    if token in ("true", "false"):
        return token == "true"
    raise GoTemplateError(f"unknown word {token!r}")


def _fields(value, path: str):
    for name in path.split("."):
        value = value.get(name) if isinstance(value, dict) else None
    return value


def _truth(value) -> bool:
    return bool(value)


def _text(value) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _and(*values):
    for value in values:
        if not _truth(value):
            return value
    return values[-1]


def _or(*values):
    for value in values:
        if _truth(value):
            return value
    return values[-1]


FUNCTIONS = {
    "eq": lambda a, *others: any(a == b for b in others),
    "ne": lambda a, b: a != b,
    "and": _and,
    "or": _or,
    "not": lambda a: not _truth(a),
    "len": lambda a: len(a or []),
    "slice": lambda a, start=0, end=None: a[start:end],
    "index": lambda a, i: a[i],
}
