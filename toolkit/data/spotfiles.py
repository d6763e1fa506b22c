"""Spot files, one parser per format: legacy-ST / her2st spot tables
(``*_selection.tsv``, STUtility alignment tables), Visium tissue positions (``.parquet``,
``tissue_positions.csv`` with a header, ``tissue_positions_list.csv`` without) and CSV
tables of ``x,y``. The section readers (:mod:`mclx.data.her2st`, :mod:`mclx.data.visium`,
...) and ``mclx infer --spots`` (:func:`mclx.data.readers.read_spots`) parse with these.

Spots for inference are frames of ``id, x, y`` (level-0 pixels) and, on an array grid,
``array_x, array_y``.
"""

from __future__ import annotations

import csv
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from mclx.data.arrays import SPOT_DIAMETER_UM, estimate_mpp
from mclx.errors import DataError, short

# what pandas raises on a file it cannot parse: bad gzip (OSError, EOFError, zlib.error),
# bad text (UnicodeDecodeError, ParserError, EmptyDataError: all ValueError), csv.Error
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, csv.Error, pd.errors.ParserError)

POSITION_COLUMNS = [
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]


def read_table(path: Path, **kw) -> pd.DataFrame:
    """``pd.read_csv`` with a one-line error naming the spot file."""
    try:
        return pd.read_csv(path, **kw)
    except READ_ERRORS as exc:
        msg = f"{path}: cannot read spot file ({short(exc)})"
        raise DataError(msg) from exc


def read_selection(path: Path) -> pd.DataFrame:
    """Selected spots of a ``*_selection.tsv`` file, indexed by ``"{x}x{y}"``."""
    try:
        spots = pd.read_csv(path, sep="\t")
    except READ_ERRORS as exc:
        msg = f"{path}: cannot read spot file ({short(exc)})"
        raise DataError(msg) from exc
    need = ["x", "y", "pixel_x", "pixel_y"]
    if not set(need) <= set(spots.columns):
        msg = f"{path}: spot file lacks columns {sorted(set(need) - set(spots.columns))}"
        raise DataError(msg)
    if "selected" in spots.columns:
        spots = spots[pd.to_numeric(spots["selected"], errors="coerce") == 1]
    coords = spots[need].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    if coords.isna().to_numpy().any():
        first = coords.index[coords.isna().any(axis=1).to_numpy()][0]
        line = f" (line {first + 2})" if isinstance(first, (int, np.integer)) else ""
        msg = f"{path}: spot file has missing or non-numeric coordinates{line}"
        raise DataError(msg)
    values = coords.to_numpy()
    if not np.isfinite(values).all():
        msg = f"{path}: spot file has infinite coordinates"
        raise DataError(msg)
    xy = values[:, :2]
    if (xy != np.round(xy)).any() or (np.abs(xy) > 1e6).any():
        msg = f"{path}: spot array coordinates x, y must be integers"
        raise DataError(msg)
    spots = spots.assign(
        x=xy[:, 0].astype(np.int64),
        y=xy[:, 1].astype(np.int64),
        pixel_x=values[:, 2],
        pixel_y=values[:, 3],
    )
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    if spots.index.duplicated().any():
        msg = f"{path}: duplicate spots {list(spots.index[spots.index.duplicated()][:5])}"
        raise DataError(msg)
    return spots


def selection_spots(path: Path) -> pd.DataFrame:
    """The selected spots of a her2st / ST spot file as spots for inference."""
    sel = read_selection(path)
    out = pd.DataFrame(
        {
            "id": sel.index,
            "x": sel["pixel_x"],
            "y": sel["pixel_y"],
            "array_x": sel["x"],
            "array_y": sel["y"],
        }
    )
    out.attrs["spot_diameter_um"] = SPOT_DIAMETER_UM["1k"]  # legacy ST, either array
    return out


def read_positions_file(path: Path) -> pd.DataFrame:
    """One Visium tissue positions file (parquet, CSV with or without header), indexed by
    barcode, every column numeric; the one parser of this format in mclx."""
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path).set_index("barcode")
        else:  # tissue_positions.csv has a header, tissue_positions_list.csv has none
            df = pd.read_csv(path, index_col=0)
            if "pxl_row_in_fullres" not in df.columns:
                names = ["barcode", *POSITION_COLUMNS]
                df = pd.read_csv(path, header=None, index_col=0, names=names)
        df = df[POSITION_COLUMNS].apply(pd.to_numeric, errors="coerce")
    except (*READ_ERRORS, KeyError, ImportError) as exc:
        msg = f"{path}: cannot read tissue positions ({short(exc)})"
        raise DataError(msg) from exc
    if df.isna().to_numpy().any() or df.index.duplicated().any():
        msg = f"{path}: tissue positions have missing, non-numeric or duplicate entries"
        raise DataError(msg)
    df.index = df.index.astype(str)
    return df


def positions_frame(positions: pd.DataFrame, path: Path) -> pd.DataFrame:
    """In-tissue positions as spots (id, x, y, array_x, array_y in full-resolution pixels),
    with the µm/px of the whole grid (every position, in tissue or not) in ``attrs["mpp"]``."""
    pos = positions[positions["in_tissue"] == 1]
    if pos.empty:
        msg = f"{path}: no spot is in tissue"
        raise DataError(msg)
    out = pd.DataFrame(
        {
            "id": pos.index.astype(str),
            "x": pos["pxl_col_in_fullres"].to_numpy(np.float64),
            "y": pos["pxl_row_in_fullres"].to_numpy(np.float64),
            "array_x": pos["array_col"].to_numpy(np.int64),
            "array_y": pos["array_row"].to_numpy(np.int64),
        }
    )
    full = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    grid = positions[["array_col", "array_row"]].to_numpy(np.int64)
    out.attrs["mpp"] = estimate_mpp(grid, full, "visium")
    out.attrs["spot_diameter_um"] = SPOT_DIAMETER_UM["visium"]
    return out


def csv_spots(df: pd.DataFrame) -> pd.DataFrame:
    """Spots of a CSV with ``x,y`` columns and an optional ``id`` (default ``spot_<i>``)."""
    ids = df["id"].astype(str) if "id" in df.columns else [f"spot_{i}" for i in range(len(df))]
    return pd.DataFrame({"id": ids, "x": numbers(df["x"]), "y": numbers(df["y"])})


def check_spots(path: Path, out: pd.DataFrame) -> pd.DataFrame:
    """Refuse no spots, coordinates that are not finite numbers, and duplicate spots."""
    if out.empty:
        msg = f"{path}: no spots"
        raise DataError(msg)
    if not np.isfinite(out[["x", "y"]].to_numpy(float)).all():
        msg = f"{path}: spot coordinates are missing, not numbers or not finite"
        raise DataError(msg)
    if out["id"].duplicated().any() or out[["x", "y"]].duplicated().any():
        msg = f"{path}: duplicate spots"
        raise DataError(msg)
    return out


def numbers(col: pd.Series) -> pd.Series:
    """A column as float64; what is not a number becomes NaN (refused by the caller)."""
    return pd.to_numeric(col, errors="coerce").astype(np.float64)
