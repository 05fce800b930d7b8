"""Reading a user's YAML file: every mistake named with its file and line."""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import UserError


class UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping: YAML keeps the last silently, so
    `lr: 1e-4` near the top and `lr: 1e-3` further down trained with 1e-3 and nothing said so."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # keys merged from `<<: *base` may be overridden; that is what merging is for
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, what: str = "config") -> tuple[object, str]:
    """(the parsed document, its text) of a YAML file; a missing, unreadable, non-UTF-8 or invalid file
    (or one with a key given twice) is a UserError naming the file and, where there is one, the line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} file not found") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read {what} ({type(err).__name__})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}); save the {what} as UTF-8") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader), text
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
