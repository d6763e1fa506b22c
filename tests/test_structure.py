"""Conventions of the product code that a reader relies on (scanpy's
test_package_structure): short functions, cheap imports of the data-flow modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = [p for d in ("toolkit", "export", "kernels") for p in sorted((ROOT / d).rglob("*.py"))]
MAX_LINES = 60
LONG_OK = "# long:"  # a comment on the def line that says why a function may be longer


def _functions(path: Path):
    source = path.read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node, lines[node.lineno - 1]


def test_no_product_function_is_longer_than_60_lines():
    assert len(PRODUCT) > 40
    long = [
        f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for p in PRODUCT
        for node, first in _functions(p)
        if node.end_lineno - node.lineno + 1 > MAX_LINES and LONG_OK not in first
    ]
    assert long == []


@pytest.mark.parametrize(
    "module",
    [
        "mclx.inference",
        "mclx.training.recipe",
        "mclx.cli",
        "mclx.export.exporter",
        "mclx.wsi.engine",
    ],
)
def test_data_flow_modules_import_without_heavy_libraries(module):
    code = (
        f"import sys, {module}; "
        "heavy = {'torch', 'scanpy', 'anndata', 'tensorrt', 'cupy', 'onnxruntime', 'openslide'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the import graph: no cycles, function-local imports included ----------------------

# Top-level folders and the packages they install as (pyproject's package-dir mapping):
# tools that follow folder names cannot see that ``mclx.export`` is ``export/``.
PACKAGE_DIRS = {"toolkit": "mclx", "export": "mclx.export", "kernels": "mclx.kernels"}
# Cycles known on this branch and fixed elsewhere; each entry is removed with its fix.
KNOWN_CYCLES: list[set[str]] = []
MAX_MODULE_LINES = 400
LONG_MODULE_OK = "# long module:"  # a comment in the module that says why it is longer
KNOWN_LONG_MODULES: set[str] = set()


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Every product module by its import name (``mclx.wsi.runtime`` -> its file)."""
    names = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join([package, *parts])] = path
    return names


def _imported(module: str, path: Path, node: ast.AST, names: dict[str, Path]) -> set[str]:
    """The product modules one import statement loads (``from pkg import mod`` names the
    module ``pkg.mod`` when that is a module, else ``pkg``)."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            here = here[: len(here) - node.level + 1]
            base = ".".join([*here, base] if base else here)
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
    found = set()
    for target in targets:
        while target not in names and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in names and target != module:
            found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the product modules it imports anywhere in its body (functions too)."""
    names = module_names(root)
    graph = {}
    for module, path in names.items():
        tree = ast.parse(path.read_text())
        graph[module] = set().union(
            *(
                _imported(module, path, n, names)
                for n in ast.walk(tree)
                if isinstance(n, ast.Import | ast.ImportFrom)
            )
        )
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_function_local_imports(tmp_path):
    """The graph follows imports inside functions and the package-dir mapping: a loop
    hidden in a function body of ``export/`` is found."""
    for folder in PACKAGE_DIRS:
        (tmp_path / folder).mkdir()
    (tmp_path / "toolkit" / "a.py").write_text("def f():\n    from mclx.export import b\n")
    (tmp_path / "export" / "b.py").write_text("from mclx import a\n")
    (tmp_path / "kernels" / "c.py").write_text("from . import d\n")
    (tmp_path / "kernels" / "d.py").write_text("import os\n")
    assert cycles(import_graph(tmp_path)) == [{"mclx.a", "mclx.export.b"}]


def test_no_import_cycles():
    found = [c for c in cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert found == []


def test_no_module_is_longer_than_400_lines_without_a_reason():
    long = [
        f"{p.relative_to(ROOT)} ({n})"
        for p in PRODUCT
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
        and LONG_MODULE_OK not in p.read_text()
        and str(p.relative_to(ROOT)) not in KNOWN_LONG_MODULES
    ]
    assert long == []
