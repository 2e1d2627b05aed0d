"""The package's rooms (llama/, formats/, run/, engine/, convert/, ...) import each other without
cycles, counting imports inside functions too: a cycle means a concept has no single home."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ellama_megatron"


def room_of(module: str) -> str | None:
    """``ellama_megatron.convert.importer`` -> ``convert``; the package root itself is no room."""
    parts = module.split(".")
    if parts[0] != "ellama_megatron" or len(parts) < 2:
        return None
    return parts[1]


def room_imports() -> dict[str, dict[str, list[str]]]:
    """room -> {imported room: [file:line, ...]} for every import, at any depth of the file."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        if len(rel.parts) < 3:  # files in the package root (ellama_megatron/__init__.py) are no room
            continue
        room = rel.parts[1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            # `from ellama_megatron import formats` imports the room named by the alias
            targets = {room_of(n) for n in names if n.startswith("ellama_megatron.")} - {None}
            if isinstance(node, ast.ImportFrom) and node.module == "ellama_megatron":
                targets = {a.name for a in node.names if (PACKAGE / a.name).is_dir()}
            for target in targets - {room}:
                graph.setdefault(room, {}).setdefault(target, []).append(f"{rel}:{node.lineno}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(room: str) -> list[str] | None:
        state[room] = 1
        path.append(room)
        for target in sorted(graph.get(room, {})):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if state.get(target) is None and (cycle := visit(target)):
                return cycle
        path.pop()
        state[room] = 2
        return None

    for room in sorted(graph):
        if state.get(room) is None and (cycle := visit(room)):
            return cycle
    return None


def test_the_checker_sees_a_cycle():
    graph = {"a": {"b": ["a/x.py:1"]}, "b": {"c": ["b/y.py:2"]}, "c": {"a": ["c/z.py:3"]}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": ["a/x.py:1"]}}) is None


def test_no_import_cycle_between_rooms():
    graph = room_imports()
    assert graph, "no imports between rooms found: is PACKAGE right?"
    cycle = find_cycle(graph)
    if cycle:
        edges = [f"{a} -> {b}: {', '.join(graph[a][b][:3])}" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle between rooms:\n  " + "\n  ".join(edges))


def test_library_does_not_import_its_test_stand_ins():
    """ellama_megatron/testing/ serves the tests and the demo; the library proper never needs it."""
    graph = room_imports()
    users = {room: where["testing"] for room, where in graph.items() if "testing" in where}
    assert not users, f"library rooms import ellama_megatron.testing: {users}"


def test_library_does_not_import_the_checkouts_scripts():
    """recipes/ (the demo too), tools/, benchmarks/ and tests/ use the package, never the other way: the
    installed wheel has none of them (the demo's corpora live in ellama_megatron/testing/ for this)."""
    outside = {"recipes", "tools", "benchmarks", "tests"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [
                f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {n}"
                for n in names
                if n.split(".")[0] in outside
            ]
    assert not found, "the library imports the checkout's scripts:\n  " + "\n  ".join(found)
