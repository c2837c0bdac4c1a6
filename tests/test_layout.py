"""Tests for the layout of the fairpruner package: imports go one way (no cycle among its modules, no fairpruner
import inside a function), modules stay small, and the public face exposes what the README documents.

The import graph is read statically with ``ast``: the statements a module runs when imported (its top level,
including ``try``/``if``/``with`` blocks and class bodies, but not function bodies or ``if TYPE_CHECKING:``).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

import fairpruner as fp

SRC = Path(__file__).resolve().parents[1] / "src" / "fairpruner"
FILES = sorted(SRC.rglob("*.py"))
MAX_LINES = 420


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in FILES}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time(body: List[ast.stmt]) -> Iterator[ast.stmt]:
    """The import statements run when the module is imported."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_time(node.body)
            yield from _import_time(node.orelse)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _import_time(block)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            yield from _import_time(node.body)
            yield from _import_time(getattr(node, "orelse", []))
        elif isinstance(node, ast.ClassDef):
            yield from _import_time(node.body)


def _package_of(module: str) -> str:
    """The package a module's relative imports start from (a package's __init__ is its own package)."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _targets(module: str, node: ast.stmt) -> Set[str]:
    """fairpruner modules a statement imports explicitly: ``from .pkg import name`` imports ``pkg`` (its
    __init__), and ``pkg.name`` too where that is a submodule; ``from . import x`` imports the submodule x."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = _package_of(module).split(".")
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source not in MODULES:
        return set()
    # A submodule is imported as itself; any other name comes from the module (a package: its __init__).
    return {f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names}


def _ancestors(module: str) -> List[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> Dict[str, Set[str]]:
    """module -> the fairpruner modules importing it runs. Importing ``a.b.c`` also runs the __init__ of every
    package above it, except those the importing module sits in (they are already in ``sys.modules``)."""
    graph = {}
    for module, path in MODULES.items():
        deps: Set[str] = set()
        own = set(_ancestors(module))
        for node in _import_time(ast.parse(path.read_text()).body):
            for target in _targets(module, node):
                deps.add(target)  # `from . import name` in a submodule reads its package's __init__ too
                deps |= {t for t in _ancestors(target) if t not in own}
        deps.discard(module)
        graph[module] = deps
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read_correctly():
    graph = import_graph()
    assert "fairpruner.families" in graph["fairpruner"]  # from . import families
    assert "fairpruner._measure.counting" in graph["fairpruner"]  # from ._measure.counting import count_macs
    assert "fairpruner._measure" in graph["fairpruner"]  # ... which runs _measure/__init__ first
    assert "fairpruner.families.base" in graph["fairpruner.families"]
    assert "fairpruner._core.groups" in graph["fairpruner.families.base"]
    assert "fairpruner._core" in graph["fairpruner.families.base"]


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = _cycles(import_graph())
    assert not cycles, f"fairpruner modules importing each other (directly or through others): {cycles}"


def _function_imports(tree: ast.AST) -> Iterator[ast.stmt]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (
                        inner.level or (inner.module or "").split(".")[0] == "fairpruner"):
                    yield inner
                elif isinstance(inner, ast.Import) and any(a.name.split(".")[0] == "fairpruner"
                                                           for a in inner.names):
                    yield inner
                elif isinstance(inner, ast.Call) and inner.args and isinstance(inner.args[0], ast.Constant) \
                        and isinstance(inner.args[0].value, str) \
                        and inner.args[0].value.split(".")[0] in ("fairpruner", "") \
                        and ast.unparse(inner.func) in ("importlib.import_module", "import_module", "__import__"):
                    yield inner


def test_no_fairpruner_import_inside_a_function():
    found = sorted({f"{path.relative_to(SRC)}:{node.lineno}" for path in FILES
                    for node in _function_imports(ast.parse(path.read_text()))})
    assert not found, f"fairpruner imported inside a function (import at module level instead): {found}"


def test_import_inside_a_function_is_detected():
    code = "def f():\n    from . import x\n\ndef g():\n    import fairpruner.data\n\nimport fairpruner\n"
    assert [n.lineno for n in _function_imports(ast.parse(code))] == [2, 5]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines (at most {MAX_LINES}); split it"


def test_public_face():
    for name in ("score", "plan", "sweep", "prune", "mask", "save", "load", "finetune", "evaluate", "recalibrate",
                 "report", "count_macs", "count_params", "families"):
        assert hasattr(fp, name), name
        assert name in fp.__all__, name
    assert callable(fp.score) and callable(fp.families.register)
    missing = [n for n in fp.__all__ if not hasattr(fp, n)]
    assert not missing, f"fp.__all__ names attributes that do not exist: {missing}"
    assert len(set(fp.__all__)) == len(fp.__all__)
    assert not [n for n in fp.families.__all__ if not hasattr(fp.families, n)]
