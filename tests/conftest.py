"""Shared fixtures: the real her2st folder (skip or fail when absent) and synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def her2st_path() -> Path:
    return Path(os.environ.get("MCLX_HER2ST", ROOT.parent / "shared" / "data" / "her2st"))


@pytest.fixture(scope="session")
def her2st() -> Path:
    """The real HER2+ data; skipped when absent unless MCLX_REQUIRE_DATA=1."""
    path = her2st_path()
    if not (path / "data" / "ST-cnts").is_dir() and not (path / "ST-cnts").is_dir():
        reason = f"her2st data not found at {path} (set MCLX_HER2ST)"
        if os.environ.get("MCLX_REQUIRE_DATA") == "1":
            pytest.fail(reason + " and MCLX_REQUIRE_DATA=1")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """A small her2st-layout dataset with a learnable image -> expression relation."""
    from mclx.data.synthetic import write_synthetic_her2st

    return write_synthetic_her2st(tmp_path_factory.mktemp("synthetic"))
