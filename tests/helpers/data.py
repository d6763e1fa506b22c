"""Where the test data lives: the real her2st folder (optional, or required with
``MCLX_REQUIRE_DATA=1``) and the synthetic her2st-layout folder the fixtures write."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
REQUIRE_DATA = "MCLX_REQUIRE_DATA"


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
