"""Reading a user's YAML file: every mistake named with its file and line."""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import UserError


# Nodes a document may hold once its aliases are expanded: a config is a few hundred; a few hundred
# bytes of nested aliases ("billion laughs") expand to billions and take every byte of memory.
MAX_EXPANDED_NODES = 100_000


class Refused(yaml.constructor.ConstructorError):
    """A document YAML itself would load that tunesmith refuses (a key twice, aliases without end)."""


class GuardedLoader(yaml.SafeLoader):
    """A safe loader that refuses a document whose aliases expand past MAX_EXPANDED_NODES."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None and expanded_size(node, {}) > MAX_EXPANDED_NODES:
            raise Refused(None, None, f"more than {MAX_EXPANDED_NODES:,} values (its aliases expanded)", node.start_mark)
        return node


class UniqueKeyLoader(GuardedLoader):
    """...and a key given twice in one mapping: YAML keeps the last silently, so `lr: 1e-4` near the
    top and `lr: 1e-3` further down trained with 1e-3 and nothing said so."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # keys merged from `<<: *base` may be overridden; that is what merging is for
            key = self.construct_object(key_node)
            if key in seen:
                raise Refused(None, None, f"'{key}' is given twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def expanded_size(node, sizes: dict) -> int:
    """Values in a composed node once every alias is expanded (an alias is the same node object;
    each is counted once per use, computed once)."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a node inside itself (a recursive alias) counts as one until known
        children = node.value if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) else []
        flat = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
        total = 1
        for child in flat:
            total += expanded_size(child, sizes)
            if total > MAX_EXPANDED_NODES:
                break
        sizes[id(node)] = total
    return sizes[id(node)]


def shortened(value, limit: int = 200) -> str:
    """repr of a value for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def parse_yaml(text: str, unique_keys: bool = True):
    """A YAML document from text with read_yaml's checks (`unique_keys=False`: a key twice keeps the
    last, as in others' files); raises yaml.YAMLError (RecursionError for nesting deeper than Python's
    stack, turned into one)."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader if unique_keys else GuardedLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def read_yaml(path: str | Path, what: str = "config") -> tuple[object, str]:
    """(the parsed document, its text) of a YAML file; a missing, unreadable, non-UTF-8 or invalid file
    (or one with a key given twice) is a UserError naming the file and, where there is one, the line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        run = (Path(path) / "config.yaml").is_file()  # a run folder: its config, or its model for a new run
        raise UserError(f"{path}: a folder, not a {what} file" + (
            f"; the run's own config is {Path(path) / 'config.yaml'}, and a new run starts from its model with "
            f"`model: {path}` (plan: --model {path})" if run else "")) from None
    except OSError as err:
        raise UserError(f"{path}: cannot read {what} ({type(err).__name__})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}); save the {what} as UTF-8") from None
    try:
        return parse_yaml(text), text
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
