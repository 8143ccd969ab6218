"""The code's layout: no import cycles, the folders' boundaries, small modules.

Imports are read from the source (``ast``), not executed: every ``import`` anywhere in a module,
module level or inside a function, except under ``if TYPE_CHECKING:`` (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "strategies", "tasks", "data_prep", "privacy", "fedimaging", "deploy", "bench")
MAX_LINES = 350


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(name: str, path: Path) -> set[str]:
    """Project modules that module ``name`` imports."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:
                found.add(f"{target}.{alias.name}")  # "from pkg import submodule"
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    edges = set()
    for target in found:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.add(target)
            # importing a module of another top-level package runs that package's __init__ too
            top = target.split(".")[0]
            if top != name.split(".")[0] and top in MODULES:
                edges.add(top)
    return edges


GRAPH = {name: _imported(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _within_package(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ importing its own modules is how packages work; not a cycle."""
    return {v: {w for w in ws if not (v == w.split(".")[0] and w.startswith(v + "."))
                and not (w == v.split(".")[0] and v.startswith(w + "."))}
            for v, ws in graph.items()}


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(_within_package(GRAPH)) == []


@pytest.mark.parametrize(("package", "forbidden"), [
    ("tasks", ("flwr", "app", "strategies")),
    ("strategies", ("monai", "tasks", "app")),
    ("data_prep", ("flwr", "app", "strategies", "tasks")),
])
def test_package_boundaries(package, forbidden):
    for name, path in MODULES.items():
        if name.split(".")[0] != package:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for imported in names:
                assert imported.split(".")[0] not in forbidden, f"{name} imports {imported}"


def test_the_site_imports_no_server_code():
    for name in ("app.client_app", "app.site_runtime", "app.site_mods", "app.site_state"):
        server = sorted(m for m in GRAPH[name] if m.split(".")[0] == "strategies" or m == "app.server_app")
        assert not server, f"{name} imports server code {server}"


@pytest.mark.parametrize("package", ["app", "strategies"])
def test_modules_stay_small(package):
    for name, path in MODULES.items():
        if name.split(".")[0] == package:
            lines = len(path.read_text().splitlines())
            assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (limit {MAX_LINES})"
