"""mclx's cache folder: work done once per machine and reused by later runs.

``$MCLX_CACHE_DIR``, else ``$XDG_CACHE_HOME/mclx``, else ``~/.cache/mclx``. What lives
there is derived from inputs named in each file's key (a checkpoint's fingerprint, the
library versions), so a stale entry is never picked up; deleting the folder only costs
the time to rebuild. A cache that cannot be written is skipped, never an error.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The folder for ``kind`` entries (not created)."""
    root = os.environ.get("MCLX_CACHE_DIR")
    if root:
        return Path(root) / kind
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mclx" / kind
