"""Folders mclx writes, and which of them it may replace or write into.

A folder output (a viewer, a SpatialData store) carries a manifest, ``.mclx-manifest.json``:
the relative path and size of every file mclx wrote there. Such a folder is mclx's only
while it holds nothing else: a file that is not in the manifest, or whose size changed,
makes the folder the user's, and it is refused, never removed. A folder mclx writes files
into (a cohort's ``--out-dir``) keeps the same manifest for those files: one of them is
replaced only while it is still the file mclx wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = ".mclx-manifest.json"


def _files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` but the manifest: relative POSIX path -> size."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            if rel != MANIFEST:
                out[rel] = p.lstat().st_size
    return out


def read_manifest(folder: str | os.PathLike) -> dict[str, int]:
    """The files the manifest of ``folder`` lists (relative path -> size); empty when
    there is none or it cannot be read (then nothing there counts as mclx's)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
        files = data["files"]
        return {str(k): int(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write_manifest(folder: str | os.PathLike) -> Path:
    """List every file under ``folder`` (written by mclx) in its manifest."""
    path = Path(folder) / MANIFEST
    path.write_text(manifest_text(_files(Path(folder))))
    return path


def manifest_text(files: dict[str, int]) -> str:
    """The manifest listing ``files`` (relative path -> size), as JSON."""
    from mclx import __version__

    return json.dumps(
        {"written_by": f"mclx {__version__}", "files": files}, indent=0, sort_keys=True
    )


def foreign_file(folder: str | os.PathLike) -> str | None:
    """The first file under ``folder`` that mclx did not write there (not in its manifest,
    or changed size since), as a relative path; None when every file is mclx's."""
    folder = Path(folder)
    listed = read_manifest(folder)
    for rel, size in sorted(_files(folder).items()):
        if listed.get(rel) != size:
            return rel
    return None


def check_replaceable(path: str | os.PathLike, *, what: str, markers: tuple[str, ...] = ()) -> None:
    """Refuse to replace the folder ``path`` unless it is missing, empty, or holds
    nothing but what mclx wrote there (its manifest says so). ``markers``: files such
    a folder has, named in the message when the folder has none of them."""
    path = Path(path)
    if not path.is_dir() or not any(path.iterdir()):
        return
    rel = foreign_file(path)
    if rel is None:
        return
    if not (path / MANIFEST).is_file():
        hint = " or ".join([MANIFEST, *[m for m in markers if not (path / m).exists()]])
        msg = (
            f"{path}: a folder that is not {what} (no {hint}) is there; "
            "remove it or choose another output"
        )
    else:
        msg = (
            f"{path}: holds {rel}, which mclx did not write there ({what} is replaced only "
            "while it holds nothing else); move it away or choose another output"
        )
    raise FileExistsError(msg)


def check_own_file(path: str | os.PathLike, *, folder: str | os.PathLike) -> None:
    """Refuse to write over ``path`` in ``folder`` unless mclx wrote it there (listed in
    the folder's manifest with its size), or it does not exist."""
    path, folder = Path(path), Path(folder)
    if not path.exists() and not path.is_symlink():
        return
    rel = os.path.relpath(path, folder)
    mine = read_manifest(folder).get(rel)
    if path.is_file() and not path.is_symlink() and mine == path.stat().st_size:
        return
    msg = (
        f"{path}: exists and mclx did not write it in {folder} (not in its {MANIFEST}); "
        "move it away or choose another output folder"
    )
    raise FileExistsError(msg)
