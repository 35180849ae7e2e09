"""The layers hold: ``kvlingua`` never imports Ray (every submodule, in a fresh interpreter), and no file of
``kvlingua``, ``experiments``, ``orchestrator``, ``workers`` or ``serve_apps`` imports another in a circle (the import
graph from ``ast``)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kvlingua", "experiments", "orchestrator", "workers", "serve_apps")


def test_no_kvlingua_module_imports_ray():
    code = ("import importlib, json, pkgutil, sys, kvlingua\n"
            "names = [m.name for m in pkgutil.walk_packages(kvlingua.__path__, 'kvlingua.')]\n"
            "for n in names: importlib.import_module(n)\n"
            "print(json.dumps([len(names), sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    count, ray = json.loads(out.stdout.strip().splitlines()[-1])
    assert count > 40 and ray == []


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` (module ``name``) imports, at any depth of the file."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:  # ``from a.b import c`` names module a.b.c, or a.b when c is not one
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of the graph, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_circle_between_files():
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    known = set(files)
    graph = {n: {m for m in _imports(p, n, known) if not (n.startswith(m + ".") and files[m].name == "__init__.py")}
             for n, p in files.items()}
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the search finds one


def test_layers_import_one_way():
    """``kvlingua`` imports none of the packages above it; ``experiments`` does not import ``orchestrator``."""
    above = {"kvlingua": ("experiments", "orchestrator", "workers", "tune_spaces", "serve_apps"),
             "experiments": ("orchestrator",)}
    for pkg, banned in above.items():
        for p in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                bad = [n for n in names if n.split(".")[0] in banned]
                assert not bad, f"{p.relative_to(ROOT)} imports {bad}"
