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
    "module", ["mclx.inference", "mclx.recipe", "mclx.cli", "mclx.export.exporter"]
)
def test_data_flow_modules_import_without_heavy_libraries(module):
    code = (
        f"import sys, {module}; "
        "heavy = {'torch', 'scanpy', 'anndata', 'tensorrt', 'cupy', 'onnxruntime', 'openslide'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
