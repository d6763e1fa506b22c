"""Package conventions: cheap import, version agreement, layout of the import name."""

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_import_mclx_loads_no_heavy_modules():
    code = (
        "import sys, mclx, mclx.kernels, mclx.export, mclx.inference; "
        "heavy = {'torch', 'scanpy', 'tensorrt', 'cupy', 'onnxruntime', 'openslide'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_version_matches_pyproject():
    import mclx

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert mclx.__version__ == meta["project"]["version"]


def test_subpackages_map_to_top_level_folders():
    import mclx.export
    import mclx.inference
    import mclx.kernels

    assert Path(mclx.__file__).parent == ROOT / "toolkit"
    assert Path(mclx.kernels.__file__).parent == ROOT / "kernels"
    assert Path(mclx.export.__file__).parent == ROOT / "export"
    assert Path(mclx.inference.__file__).parent == ROOT / "toolkit" / "inference"


def _collected(*args: str) -> set[str]:
    """Top-level folders of the tests ``pytest --collect-only`` finds from the root."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    return {line.split("/")[0] for line in out.stdout.splitlines() if "::" in line}


def test_benchmark_only_from_the_root_runs_the_benchmarks_and_only_them():
    assert _collected("--benchmark-only") == {"bench"}
    assert _collected() == {"tests"}  # a plain run (make test) never collects them


def test_optional_extras_are_checked_one_way(monkeypatch):
    """mclx.extras answers "is it installed?" for every optional module: a missing one,
    a dotted one whose parent is missing, and one set to None (as tests hide Ray)."""
    import sys

    import pytest

    from mclx.errors import MclxError
    from mclx.extras import MissingExtra, installed, require

    assert installed("json") and not installed("mclx_no_such_module")
    assert not installed("mclx_no_such_module.sub")
    monkeypatch.setitem(sys.modules, "mclx_hidden", None)
    assert not installed("mclx_hidden")
    assert require("json", message="unused").dumps(1) == "1"
    with pytest.raises(MissingExtra, match=r"^--x needs y: pip install 'mclx\[y\]'$"):
        require("json", "mclx_hidden", message="--x needs y: pip install 'mclx[y]'")
    assert issubclass(MissingExtra, MclxError) and issubclass(MissingExtra, RuntimeError)
