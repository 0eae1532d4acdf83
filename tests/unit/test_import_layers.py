"""Imports go one way through the house, and never in a circle.

Floors, lowest first; a module may import its own package and the floors below:

0. ``thyrocad.settings``, ``thyrocad.logs``, ``thyrocad.metrics`` — import nothing of ours
1. ``thyrocad.models``, ``thyrocad.db`` — each imports only itself
2. ``thyrocad.pacs``
3. ``thyrocad.worker``
4. the rest of ``thyrocad`` (CLI, commands, runners, health)
5. ``bench``

The folders ``models/ db/ pacs/ worker/`` sit at the repository's top level but install
as ``thyrocad.models`` … (pyproject's package-dir), and are imported only by those names.
Every import counts: at module level, inside functions and under ``TYPE_CHECKING``.
Imports of our own code are absolute (``from thyrocad.db import repository``), never relative.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "db", "pacs", "worker", "thyrocad", "bench")
#: The folders installed inside the thyrocad namespace.
NAMESPACED = ("models", "db", "pacs", "worker")
GROUND = ("thyrocad.settings", "thyrocad.logs", "thyrocad.metrics")
FLOORS = {"ground": 0, "models": 1, "db": 1, "pacs": 2, "worker": 3, "thyrocad": 4, "bench": 5}

#: (importing module, imported module) pairs allowed for now, each with its reason.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module of ours
    path: str
    line: int


def module_name(path: str) -> str:
    """The name a file imports as once installed: ``pacs/meta.py`` is ``thyrocad.pacs.meta``."""
    parts = path.removesuffix(".py").split("/")
    if parts[0] in NAMESPACED:
        parts = ["thyrocad", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """The package a module belongs to for the rules: ``ground``, one of the namespaced
    parts (``thyrocad.pacs`` is ``pacs``), ``thyrocad`` or ``bench``."""
    if module in GROUND:
        return "ground"
    parts = module.split(".")
    if parts[0] == "thyrocad" and len(parts) > 1 and parts[1] in NAMESPACED:
        return parts[1]
    return parts[0]


def imports(path: str, text: str, known: set[str]) -> tuple[list[Import], list[str]]:
    """The imports of our modules in one file, and the problems found reading it."""
    source = module_name(path)
    found, problems = [], []
    for node in ast.walk(ast.parse(text, path)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                problems.append(f"{path}:{node.lineno}: a relative import; write it absolute")
                continue
            base = node.module or ""
            # ``from thyrocad.db import repository`` imports the module thyrocad.db.repository.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        for name in names:
            top = name.split(".")[0]
            if top in NAMESPACED:
                problems.append(
                    f"{path}:{node.lineno}: imports {name} by its folder's name; "
                    f"write thyrocad.{name}"
                )
                continue
            if top not in PACKAGES:
                continue
            while name not in known and "." in name:  # a name inside a module
                name = name.rsplit(".", 1)[0]
            edge = Import(source, name, path, node.lineno)
            if name != source and edge not in found:
                found.append(edge)
    return found, problems


def against_the_floors(edge: Import) -> str | None:
    """Why this import breaks the floor order, or None when it goes down or sideways."""
    here, there = room(edge.source), room(edge.target)
    if here == there and here != "ground":
        return None  # within one package: only cycles are checked
    if here == "ground":
        return "the ground floor (settings, logs, metrics) imports nothing of ours"
    if here in ("models", "db"):
        return f"{here} imports nothing of ours but itself"
    if FLOORS[there] >= FLOORS[here]:
        return (
            f"{here} (floor {FLOORS[here]}) may not import {there} (floor {FLOORS[there]}): "
            "imports go down the floors"
        )
    return None


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The circles of the graph: its strongly connected components of two or more
    modules (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _path_through(component: list[str], graph: Mapping[str, Iterable[str]]) -> list[str]:
    """A shortest way from the component's first module back to itself, inside it."""
    start, inside = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        later = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    trail = [node]
                    while trail[-1] != start:
                        trail.append(previous[trail[-1]])
                    return [*reversed(trail), start]
                if nxt in inside and nxt not in previous:
                    previous[nxt] = node
                    later.append(nxt)
        frontier = later
    return component


def check(sources: Mapping[str, str]) -> list[str]:
    """Every broken rule in ``sources`` ({path relative to the root: text}), one line each."""
    known = {module_name(path) for path in sources}
    problems: list[str] = []
    edges: list[Import] = []
    for path, text in sorted(sources.items()):
        found, unreadable = imports(path, text, known)
        edges += found
        problems += unreadable
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], Import] = {}
    for edge in edges:
        if (edge.source, edge.target) in ALLOWED:
            continue
        graph.setdefault(edge.source, set()).add(edge.target)
        where.setdefault((edge.source, edge.target), edge)
        reason = against_the_floors(edge)
        if reason:
            problems.append(f"{edge.path}:{edge.line}: imports {edge.target}: {reason}")
    for component in cycles(graph):
        circle = _path_through(component, graph)
        steps = [where[pair] for pair in zip(circle, circle[1:], strict=False)]
        trail = ", ".join(f"{s.path}:{s.line} imports {s.target}" for s in steps)
        problem = f"a cycle: {' -> '.join(circle)} ({trail})"
        if len(component) > len(circle) - 1:
            problem += f"; the same circle takes in {', '.join(component)}"
        problems.append(problem)
    return problems


def house_sources() -> dict[str, str]:
    return {
        path.relative_to(ROOT).as_posix(): path.read_text()
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def test_imports_go_down_the_floors_without_cycles() -> None:
    problems = check(house_sources())
    assert not problems, "import rules broken:\n" + "\n".join(problems)


def test_an_upward_import_is_caught() -> None:
    problems = check(
        {
            "db/engine.py": "import sqlalchemy\n",
            "worker/app.py": "def f():\n    from thyrocad.cli import main\n",
            "thyrocad/__init__.py": "",
            "thyrocad/cli.py": "from thyrocad.db import engine\n",
            "thyrocad/settings.py": "from thyrocad.db.engine import make_engine\n",
            "models/data.py": "from thyrocad.settings import Settings\n",
        }
    )
    assert [p.split(": ", 2)[:2] for p in problems] == [
        ["models/data.py:1", "imports thyrocad.settings"],
        ["thyrocad/settings.py:1", "imports thyrocad.db.engine"],
        ["worker/app.py:2", "imports thyrocad.cli"],
    ]
    assert "worker (floor 3) may not import thyrocad (floor 4)" in problems[2]
    assert "the ground floor" in problems[1] and "models imports nothing" in problems[0]


def test_a_cycle_is_caught() -> None:
    problems = check(
        {
            "worker/a.py": "from thyrocad.worker.b import x\n",
            "worker/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from thyrocad.worker.c import y\n",
            "worker/c.py": "def f():\n    import thyrocad.worker.a\n",
            "worker/d.py": "from thyrocad.worker import a\n",
        }
    )
    w = "thyrocad.worker"
    assert problems == [
        f"a cycle: {w}.a -> {w}.b -> {w}.c -> {w}.a (worker/a.py:1 imports {w}.b, "
        f"worker/b.py:3 imports {w}.c, worker/c.py:2 imports {w}.a)"
    ]


def test_a_relative_import_is_refused() -> None:
    problems = check({"pacs/a.py": "from .b import x\n", "pacs/b.py": "x = 1\n"})
    assert problems == ["pacs/a.py:1: a relative import; write it absolute"]


def test_an_import_by_the_folder_name_is_refused() -> None:
    """``import pacs`` works from the repository root by accident and makes a second copy
    of every module it touches; installed, it does not exist."""
    problems = check({"worker/a.py": "from pacs.meta import x\n", "pacs/meta.py": "x = 1\n"})
    assert problems == [
        "worker/a.py:1: imports pacs.meta by its folder's name; write thyrocad.pacs.meta"
    ]
