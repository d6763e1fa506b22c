"""Reader for 10x Visium Space Ranger output (``outs/``), one section per folder.

- counts: ``filtered_feature_bc_matrix.h5``, read by ``scanpy.read_10x_h5`` (gene symbols,
  made unique as scanpy does);
- positions: ``spatial/tissue_positions.parquet`` or ``tissue_positions.csv`` (header,
  Space Ranger 2.x and later) or ``tissue_positions_list.csv`` (no header, 1.x): barcode,
  in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres;
- image: the full-resolution image given with ``--image`` (coordinates as they are), else
  ``spatial/tissue_hires_image.png`` (else the lowres one) with the coordinates scaled by
  ``scalefactors_json.json``'s factor for it.

``--data`` is an outs folder (the section is named after it, or after its parent when it
is called ``outs``) or a folder of them (``NAME/`` or ``NAME/outs/``: section NAME).
``x``, ``y`` are ``array_col``, ``array_row``; the µm/px comes from the hexagonal grid
(spots 100 µm apart, :mod:`mclx.data.arrays`) in full-resolution pixels, divided by the
scale factor of the image read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mclx.data.layout import Reader, check_inside, first_existing, register
from mclx.data.spaceranger import scale_factor
from mclx.data.spotfiles import positions_frame, read_positions_file
from mclx.errors import DataError, short

COUNTS = "filtered_feature_bc_matrix.h5"
POSITIONS = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
IMAGES = (("hires", "tissue_hires_image.png"), ("lowres", "tissue_lowres_image.png"))


def _outs(folder: Path) -> Path | None:
    for cand in (folder, folder / "outs"):
        if (cand / COUNTS).is_file() and (cand / "spatial").is_dir():
            return cand
    return None


@register
class VisiumReader(Reader):
    """Space Ranger outs folders (see the module docstring)."""

    name = "visium"
    looks_for = f"{COUNTS} and spatial/ in DIR, DIR/outs or its subfolders"

    @classmethod
    def find(cls, path: Path) -> Path | None:
        if not path.is_dir():
            return None
        if _outs(path) is not None or any(_outs(p) for p in path.iterdir() if p.is_dir()):
            return path
        return None

    def _folders(self) -> dict[str, Path]:
        own = _outs(self.root)
        if own is not None:
            name = self.root.parent.name if self.root.name == "outs" else self.root.name
            return {name: own}
        subs = {p.name: _outs(p) for p in sorted(self.root.iterdir()) if p.is_dir()}
        return {k: v for k, v in subs.items() if v is not None}

    def _all_sections(self) -> list[str]:
        return sorted(self._folders())

    def _image(self, section: str) -> tuple[Path | None, str]:
        """The image read for ``section`` and which one it is (fullres, hires, lowres)."""
        if section in self.images:
            return self.images[section], "fullres"
        spatial = self._folders()[section] / "spatial"
        for kind, name in IMAGES:
            if (spatial / name).is_file():
                return spatial / name, kind
        return None, ""

    def image_path(self, section: str) -> Path | None:
        return self._image(section)[0]

    def extent(self) -> tuple[int, int]:
        pos = [read_positions(f / "spatial")[0] for f in self._folders().values()]
        return (
            max([0, *(int(p["array_col"].max()) for p in pos)]) + 1,
            max([0, *(int(p["array_row"].max()) for p in pos)]) + 1,
        )

    def spots(self, section: str) -> pd.DataFrame:
        """In-tissue spots in full-resolution pixels (``mclx infer --spots``)."""
        positions, path = read_positions(self._folders()[section] / "spatial")
        return positions_frame(positions, path)

    def read_section(self, section: str):
        outs = self._folders()[section]
        adata = read_counts_h5(outs / COUNTS)
        positions, pos_path = read_positions(outs / "spatial")
        pos = match_positions(adata.obs_names, positions, pos_path, outs / COUNTS)
        adata = adata[pos.index].copy()
        image, kind = self._image(section)
        scale = 1.0
        if kind not in ("fullres", ""):
            instead = "or pass --image with its full-resolution image"
            scale = scale_factor(outs / "spatial", kind, instead=instead)
        full = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
        grid = pos[["array_col", "array_row"]].to_numpy(np.int64)
        adata.obs = pd.DataFrame(
            {
                "x": grid[:, 0],
                "y": grid[:, 1],
                "pixel_x": full[:, 0] * scale,
                "pixel_y": full[:, 1] * scale,
                "section": section,
            },
            index=[f"{section}_{b}" for b in pos.index],
        )
        if image is not None:
            check_inside(image, adata.obs)
        adata.obsm["spatial"] = adata.obs[["pixel_x", "pixel_y"]].to_numpy(np.float64)
        mpp = self.full_mpp(positions_frame(positions, pos_path).attrs["mpp"])
        return self.finish(
            adata,
            section,
            array="visium",
            image=image,
            mpp=mpp / scale if mpp else None,
            counts_path=outs / COUNTS,
            spots_path=pos_path,
            image_kind=kind or "none",
        )


def read_counts_h5(path: Path):
    """Counts of a 10x ``.h5`` matrix (scanpy's reader), gene symbols made unique."""
    import warnings

    import scanpy as sc

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = sc.read_10x_h5(path)
    except Exception as exc:  # OSError from h5py, KeyError / ValueError for wrong content
        msg = f"{path}: cannot read 10x counts matrix ({short(exc)})"
        raise DataError(msg) from exc
    adata.var_names_make_unique()
    adata.X = adata.X.astype(np.float32)
    return adata


def read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    """The tissue positions of a ``spatial/`` folder, indexed by barcode, numeric."""
    path = first_existing(spatial, POSITIONS)
    if path is None:
        msg = f"{spatial}: no tissue positions file ({', '.join(POSITIONS)})"
        raise FileNotFoundError(msg)
    return read_positions_file(path), path


def match_positions(barcodes, positions: pd.DataFrame, pos_path: Path, counts: Path):
    """The in-tissue positions of the counts' barcodes, in the counts' order; every
    barcode of the counts must have a position."""
    missing = [b for b in barcodes if b not in positions.index]
    if missing:
        msg = (
            f"{pos_path}: positions do not match the counts of {counts.name}: "
            f"{len(missing)} of {len(barcodes)} barcodes have none (first: {missing[0]})"
        )
        raise DataError(msg)
    pos = positions.loc[list(barcodes)]
    pos = pos[pos["in_tissue"] == 1]
    if pos.empty:
        msg = f"{pos_path}: none of the {len(barcodes)} barcodes of {counts.name} is in tissue"
        raise DataError(msg)
    return pos
