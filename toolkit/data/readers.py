"""One dataset interface over the layouts people bring: a registry of readers.

Every reader turns one section into the same AnnData (see :mod:`mclx.data.her2st` for
the full description): raw counts in ``X``; ``obs`` with integer array coordinates ``x``,
``y``, pixel coordinates ``pixel_x``, ``pixel_y``, ``section`` and, when the data has
pathologist labels, ``label``; ``obsm["spatial"]`` the pixel coordinates on the section's
image; ``uns`` with ``section``, ``layout``, ``array`` (:mod:`mclx.data.arrays`),
``image_path`` (None without an image), ``mpp`` (µm/px of that image) and the source
files. Sections without an image still feed banks.

``open_data(path)`` detects the layout (``layout=`` forces one); ``LAYOUTS`` lists them::

    her2st     ST-cnts/ + ST-spotfiles/ (+ ST-imgs/, ST-pat/lbl/), in DIR or DIR/data
    stutility  NAME.tsv counts + alignment_table_NAME.tsv (+ NAME.jpg), legacy ST / STUtility
    visium     Space Ranger outs: filtered_feature_bc_matrix.h5 + spatial/ (or a folder of them)
    hest       HEST-1k: st/ID.h5ad (+ wsis/ID.tif, metadata/ID.json)
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mclx.data.layout import LAYOUTS, Reader
from mclx.data.spotfiles import (
    check_spots,
    csv_spots,
    positions_frame,
    read_positions_file,
    read_table,
    selection_spots,
)
from mclx.errors import DataError

if TYPE_CHECKING:
    import pandas as pd


def _load_layouts() -> None:
    """Import the reader modules (each registers itself); cheap, no heavy imports."""
    from mclx.data import her2st, hest, stutility, visium  # noqa: F401


def open_data(
    path: str | os.PathLike | Reader,
    layout: str | None = None,
    *,
    mpp: float | None = None,
    images: Mapping[str, str | os.PathLike] | None = None,
) -> Reader:
    """The reader for ``path``: ``layout`` when given, else the first layout that finds
    its files there. An existing :class:`Reader` is returned as it is."""
    if isinstance(path, Reader):
        return path
    _load_layouts()
    path = Path(path)
    if not path.exists():
        msg = f"{path}: data folder does not exist"
        raise FileNotFoundError(msg)
    if layout is not None:
        cls = layout_class(layout)
        root = cls.find(path)
        if root is None:
            msg = f"{path}: not a {layout} data folder (looked for {cls.looks_for})"
            raise DataError(msg)
        return cls(root, mpp=mpp, images=_images(images))
    for cls in LAYOUTS.values():
        root = cls.find(path)
        if root is not None:
            return cls(root, mpp=mpp, images=_images(images))
    looked = "; ".join(f"{c.name}: {c.looks_for}" for c in LAYOUTS.values())
    msg = f"{path}: no known data layout (looked for {looked})"
    raise DataError(msg)


def layout_class(name: str) -> type[Reader]:
    """The reader class of a layout name; KeyError listing the known (and close) ones."""
    _load_layouts()
    if name not in LAYOUTS:
        close = difflib.get_close_matches(name, LAYOUTS, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        msg = f"unknown data layout {name!r} (known: {', '.join(LAYOUTS)}){hint}"
        raise KeyError(msg)
    return LAYOUTS[name]


def layout_names() -> list[str]:
    _load_layouts()
    return list(LAYOUTS)


def _images(images: Mapping[str, str | os.PathLike] | None) -> dict[str, Path]:
    return {str(k): Path(v) for k, v in (images or {}).items()}


SPOT_SUFFIXES = (".h5ad", ".parquet")


def section_spots(path: str | os.PathLike):
    """Spots for ``mclx infer --spots`` from data rather than a spot table: a data folder
    of one section (any layout), a HEST ``st/ID.h5ad`` or a Visium positions ``.parquet``.
    Returns (frame of ``id, x, y, array_x, array_y``, kind for :func:`spot_mpp`)
    with the µm/px in the frame's ``attrs["mpp"]`` when the data knows it."""
    path = Path(path)
    if path.suffix == ".parquet":
        return positions_frame(read_positions_file(path), path), "visium"
    if path.suffix == ".h5ad":
        from mclx.data.hest import HestReader

        reader = HestReader(path.parent.parent) if path.parent.name == "st" else None
        if reader is None:
            msg = f"{path}: an .h5ad spot file must sit in a HEST sample folder (st/ID.h5ad)"
            raise DataError(msg)
        reader_section = path.stem
    else:
        reader = open_data(path)
        names = reader.sections()
        if len(names) != 1:
            msg = (
                f"{path}: --spots takes one section, this {reader.name} folder has "
                f"{len(names)} ({', '.join(names)}); pass that section's own spot file"
            )
            raise DataError(msg)
        reader_section = names[0]
    spots = reader.spots(reader_section)
    return spots, "visium" if reader.name == "visium" else "data"


def read_spots(path: str | os.PathLike) -> tuple[pd.DataFrame, str]:
    """Spot centres from a her2st spot file, a Visium tissue_positions file or a CSV
    with ``x,y`` (level-0 pixels, optional ``id``), or from data of any layout that
    :func:`open_data` reads (a one-section folder, a HEST ``.h5ad``, a Visium
    ``.parquet``). Returns (frame[id, x, y, ...], kind)."""
    path = Path(path)
    if path.is_dir() or (path.suffix.lower() in SPOT_SUFFIXES and path.is_file()):
        out, kind = section_spots(path)
        return check_spots(path, out), kind
    if not path.is_file():
        msg = f"{path}: spot file does not exist"
        raise FileNotFoundError(msg)
    sep = "\t" if path.suffix in (".tsv", ".txt") else ","
    df = read_table(path, sep=sep)
    cols = set(df.columns)
    if {"x", "y", "pixel_x", "pixel_y"} <= cols:
        out, kind = selection_spots(path), "her2st"
    elif {"pxl_row_in_fullres", "pxl_col_in_fullres"} <= cols or len(df.columns) == 6:
        out, kind = positions_frame(read_positions_file(path), path), "visium"
    elif {"x", "y"} <= cols:
        out, kind = csv_spots(df), "csv"
    else:
        msg = f"{path}: not a spot file (need x,y columns, a her2st or a Visium layout)"
        raise DataError(msg)
    return check_spots(path, out.reset_index(drop=True)), kind


def spot_mpp(spots, kind: str) -> float | None:
    """µm/px of the pixels of ``spots`` (:func:`read_spots`): the data's own when it knows
    it (``attrs["mpp"]``: a reader's, or a Visium grid's), else from the array grid
    (:func:`mclx.data.arrays.st_grid_mpp`, the training readers' estimate, so that
    training and inference agree); None without a grid."""
    if spots.attrs.get("mpp"):
        return float(spots.attrs["mpp"])
    if "array_x" not in spots or spots["array_x"].nunique() < 2:
        return None
    import pandas as pd

    from mclx.data.arrays import st_grid_mpp

    grid = pd.DataFrame(
        {
            "x": spots["array_x"],
            "y": spots["array_y"],
            "pixel_x": spots["x"],
            "pixel_y": spots["y"],
        }
    )
    return st_grid_mpp(grid, None if kind == "her2st" else "1k")
