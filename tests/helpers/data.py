"""Where the test data lives: the real her2st folder and the other real data sets of
``shared/data`` (optional, or required with ``MCLX_REQUIRE_DATA=1``); the synthetic
her2st-layout folder is written by a fixture."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
REQUIRE_DATA = "MCLX_REQUIRE_DATA"
# the real data sets beside her2st, and the file that says each one is there
SHARED = {
    "stutility-mob": "alignment_table_MOB1.tsv",
    "visium-fixture": "filtered_feature_bc_matrix.h5",
}


def her2st_path() -> Path:
    """``$MCLX_HER2ST``, else ``../shared/data/her2st`` beside the repository."""
    return Path(os.environ.get("MCLX_HER2ST", ROOT.parent / "shared" / "data" / "her2st"))


def her2st_available(path: Path | None = None) -> bool:
    """The her2st counts folder is there (``data/ST-cnts`` or ``ST-cnts``)."""
    path = path or her2st_path()
    return (path / "data" / "ST-cnts").is_dir() or (path / "ST-cnts").is_dir()


def data_required() -> bool:
    """``MCLX_REQUIRE_DATA=1``: a test that needs her2st fails instead of skipping."""
    return os.environ.get(REQUIRE_DATA) == "1"


def her2st_missing() -> str | None:
    """Why the her2st data cannot be used (None when it can)."""
    path = her2st_path()
    if her2st_available(path):
        return None
    return f"needs the her2st data: not found at {path} (set MCLX_HER2ST)"


def shared_path(name: str) -> Path:
    """``$MCLX_SHARED_DATA/NAME``, else ``../shared/data/NAME`` beside the repository."""
    base = os.environ.get("MCLX_SHARED_DATA", ROOT.parent / "shared" / "data")
    return Path(base) / name


def shared_missing(name: str) -> str | None:
    """Why the shared data set ``name`` cannot be used (None when it can)."""
    path = shared_path(name)
    if (path / SHARED[name]).is_file():
        return None
    return f"needs the {name} data: not found at {path} (set MCLX_SHARED_DATA)"


def c2_slide_and_spots(her2st: Path) -> tuple[Path, Path]:
    """HER2+ section C2's full-resolution image and its spot file (the region tests'
    slide)."""
    return (
        next((her2st / "data" / "ST-imgs" / "C" / "C2").glob("*.jpg")),
        her2st / "data" / "ST-spotfiles" / "C2_selection.tsv",
    )
