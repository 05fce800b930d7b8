"""The shape of the code (issue 21): no import cycles among tunesmith's modules, no module over
400 lines, and the method list taken from the registry everywhere."""
from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).parents[1] / "src" / "tunesmith"


def import_graph() -> dict[str, set[str]]:
    """module -> the tunesmith modules its import statements name (an import of a package counts
    only where it takes a name that is not a submodule; imports under TYPE_CHECKING do not count)."""
    mods = {}
    for path in SOURCE.rglob("*.py"):
        name = ".".join(path.relative_to(SOURCE.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.dump(node.test) for sub in ast.walk(node)}
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                graph[module] |= {a.name for a in node.names if a.name in mods}
                continue
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}"
                graph[module].add(full if full in mods else target)
        graph[module] &= set(mods) - {module}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    cycles = []

    def walk(node, path):
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif len(path) < 15:
                walk(nxt, path + [nxt])

    for module in graph:
        walk(module, [module])
    assert not cycles, cycles[:5]


def test_no_module_over_400_lines():
    long = {str(p.relative_to(SOURCE)): n for p in SOURCE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_method_lists_come_from_the_registry():
    """Config, CLI and plan accept exactly the registered methods; no list of method names elsewhere."""
    from tunesmith.cli import build_parser
    from tunesmith.config import AdapterConfig
    from tunesmith.methods import NAMES

    assert set(AdapterConfig.model_fields["method"].annotation.__args__) == set(NAMES)
    plan = next(a for a in build_parser()._subparsers._group_actions[0].choices["plan"]._actions
                if a.dest == "method")
    assert set(plan.choices) == set(NAMES)
    listed = [str(p.relative_to(SOURCE)) for p in SOURCE.rglob("*.py")
              if '"full", "lora", "dora", "qlora"' in p.read_text() or '"lora", "dora", "qlora", "full"' in p.read_text()]
    assert not listed, listed
