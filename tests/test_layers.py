"""The package graph: each stage imports only from the stages before it
(kernel -> observe -> judge -> output -> pipeline -> commands, over the shared
vocabulary of events and errors), and no module imports itself back through
another, lazily or not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# A package may import from its own rank and below, never above.
RANKS = {"portrace.errors": 0, "portrace.events": 0, "portrace.kernel": 1,
         "portrace.observe": 2, "portrace.judge": 3, "portrace.output": 4,
         "portrace.pipeline": 5, "portrace.commands": 6, "portrace.launch": 7,
         "portrace.__main__": 7}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Every portrace module ``name`` imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        out.update(m for m in found if m in MODULES and m != name)
    return out


def rank(name: str) -> int:
    for prefix, r in RANKS.items():
        if name == prefix or name.startswith(prefix + "."):
            return r
    raise AssertionError(f"{name} belongs to no stage: add it to RANKS")


def test_every_module_belongs_to_a_stage():
    for name in MODULES:
        if name != "portrace":
            rank(name)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "portrace"))
def test_no_upward_import(name):
    up = sorted(m for m in imports(name) if m != "portrace" and rank(m) > rank(name))
    assert not up, f"{name} imports from a later stage: {up}"


def test_no_import_circle():
    graph = {n: imports(n) - {"portrace"} for n in MODULES}
    done: set[str] = set()

    def visit(n: str, path: list[str]) -> None:
        if n in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
        if n in done:
            return
        for m in sorted(graph[n]):
            visit(m, path + [n])
        done.add(n)

    for n in sorted(graph):
        visit(n, [])
