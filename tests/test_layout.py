"""The package's shape: imports go one way (no cycle, no fairpruner import inside a function), modules stay
small, and the public face exposes what the README documents."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fairpruner as fp

SRC = Path(__file__).resolve().parents[1] / "src" / "fairpruner"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module or ""


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, modules: set) -> set:
    """fairpruner modules imported at module level (``if TYPE_CHECKING`` blocks ignored)."""
    name, is_pkg = _module_name(path), path.name == "__init__.py"
    out = set()
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.If) and _type_checking(n))]
    for node in body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fairpruner")}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, is_pkg, node)
            if not target.startswith("fairpruner"):
                continue
            for a in node.names:  # `from . import x` imports the submodule x when it is one
                sub = f"{target}.{a.name}"
                out.add(sub if sub in modules else target)
    return {m for m in out if m in modules and m != name}


def _graph():
    files = sorted(SRC.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) for p in files}
    # Importing a.b.c runs the __init__ of every package above it.
    for m, deps in graph.items():
        for d in list(deps):
            parts = d.split(".")
            deps |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules}
        deps.discard(m)
    return graph


def test_no_import_cycle():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1 and not m.startswith(d + ".") and d != "fairpruner":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # A package's own __init__ importing its submodules is the re-export pattern, not a cycle; anything else is.
    assert not cycles, cycles


def test_no_fairpruner_import_inside_a_function():
    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("fairpruner")):
                        found.append(f"{path.relative_to(SRC)}:{inner.lineno}")
                    if isinstance(inner, ast.Import) and any(a.name.startswith("fairpruner") for a in inner.names):
                        found.append(f"{path.relative_to(SRC)}:{inner.lineno}")
    assert not found, found


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 420


def test_public_face():
    for name in ("score", "plan", "sweep", "prune", "mask", "save", "load", "finetune", "evaluate", "recalibrate",
                 "report", "count_macs", "count_params", "families", "Scores", "Plan"):
        assert hasattr(fp, name), name
    assert all(hasattr(fp, n) for n in fp.__all__)
    assert all(hasattr(fp.families, n) for n in fp.families.__all__)
