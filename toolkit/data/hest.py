"""Reader for the HEST-1k sample layout (mahmoodlab/HEST): per sample ID

- ``st/ID.h5ad``: raw counts in ``X``, ``obsm["spatial"]`` spot centres in pixels of the
  full-resolution WSI; array coordinates from ``obs`` (``array_col``/``array_row``, or
  ``x``/``y``), else from ``XxY`` spot names (legacy ST), else from the pixel grid
  (coordinates rounded to half the nearest-spot distance);
- ``wsis/ID.tif``: the WSI (a pyramidal TIFF: patches are read region by region);
- ``metadata/ID.json``: ``pixel_size_um_estimated`` (else ``pixel_size_um_embedded``) is
  the WSI's µm/px; ``st_technology`` names the array (Visium, Spatial Transcriptomics).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mclx.data.jsonfile import json_object
from mclx.data.layout import Reader, check_inside, register
from mclx.errors import DataError, short

WSI_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".jpg", ".png")
PIXEL_SIZE_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")


@register
class HestReader(Reader):
    """HEST-1k samples (see the module docstring)."""

    name = "hest"
    looks_for = "st/ID.h5ad (with wsis/ID.tif, metadata/ID.json)"

    @classmethod
    def find(cls, path: Path) -> Path | None:
        st = path / "st"
        return path if st.is_dir() and any(st.glob("*.h5ad")) else None

    def _all_sections(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "st").glob("*.h5ad"))

    def image_path(self, section: str) -> Path | None:
        if section in self.images:
            return self.images[section]
        for suffix in WSI_SUFFIXES:
            if (self.root / "wsis" / f"{section}{suffix}").is_file():
                return self.root / "wsis" / f"{section}{suffix}"
        return None

    def metadata(self, section: str) -> dict:
        """``metadata/ID.json`` ({} when absent)."""
        return json_object(self.root / "metadata" / f"{section}.json", "sample metadata")

    def read_section(self, section: str):
        path = self.root / "st" / f"{section}.h5ad"
        adata = _read_h5ad(path)
        meta = self.metadata(section)
        pixels = _spatial(adata, path)
        grid = array_coords(adata, pixels)
        array = _array(meta, grid)
        adata.obs = pd.DataFrame(
            {
                "x": grid[:, 0],
                "y": grid[:, 1],
                "pixel_x": pixels[:, 0],
                "pixel_y": pixels[:, 1],
                "section": section,
            },
            index=[f"{section}_{b}" for b in adata.obs_names],
        )
        adata.obsm["spatial"] = pixels
        image = self.image_path(section)
        if image is not None:
            check_inside(image, adata.obs, size=_image_size)
        return self.finish(
            adata,
            section,
            array=array or "",
            image=image,
            mpp=self.full_mpp(_pixel_size(meta) or _grid_mpp(grid, pixels, array)),
            counts_path=path,
        )


def _read_h5ad(path: Path):
    import anndata as ad
    import scipy.sparse as sp

    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # OSError from h5py, KeyError / TypeError for wrong content
        msg = f"{path}: cannot read AnnData ({short(exc)})"
        raise DataError(msg) from exc
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    bad = ~np.isfinite(x.data) | (x.data < 0)
    if bad.any():
        msg = f"{path}: counts contain NaN, infinite or negative values ({int(bad.sum())})"
        raise DataError(msg)
    if adata.obs_names.duplicated().any() or adata.var_names.duplicated().any():
        msg = f"{path}: duplicate spot or gene names"
        raise DataError(msg)
    out = ad.AnnData(X=x, obs=adata.obs, var=pd.DataFrame(index=adata.var_names.astype(str)))
    out.obsm = adata.obsm
    return out


def _spatial(adata, path: Path) -> np.ndarray:
    xy = np.asarray(adata.obsm.get("spatial", np.empty((0, 0))), dtype=np.float64)
    if xy.shape != (adata.n_obs, 2) or not np.isfinite(xy).all():
        msg = f"{path}: obsm['spatial'] must hold finite (x, y) pixels for every spot"
        raise DataError(msg)
    return xy


def array_coords(adata, pixels: np.ndarray) -> np.ndarray:
    """(N, 2) int array coordinates (x, y) of the spots (see the module docstring)."""
    obs = adata.obs
    for cx, cy in (("array_col", "array_row"), ("x", "y")):
        if {cx, cy} <= set(obs.columns):
            xy = obs[[cx, cy]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
            if np.isfinite(xy).all() and (xy == np.round(xy)).all():
                return xy.astype(np.int64)
    parts = pd.Series(adata.obs_names).str.extract(r"(\d+)x(\d+)$")
    if not parts.isna().to_numpy().any():
        return parts.to_numpy(np.int64)
    return _grid_from_pixels(pixels)


def _grid_from_pixels(pixels: np.ndarray) -> np.ndarray:
    """Integer positions from pixel centres: half the median nearest-spot distance per
    step, so hexagonal and square grids both keep distinct spots."""
    from scipy.spatial import cKDTree

    if len(pixels) < 2:
        return np.zeros((len(pixels), 2), np.int64)
    d = np.median(cKDTree(pixels).query(pixels, k=2)[0][:, 1])
    return np.rint((pixels - pixels.min(0)) / (d / 2)).astype(np.int64)


def _array(meta: dict, grid: np.ndarray) -> str | None:
    from mclx.data.arrays import detect_st_array

    tech = str(meta.get("st_technology", "")).lower()
    if "visium" in tech and "hd" not in tech:
        return "visium"
    if "spatial transcriptomics" in tech or tech == "st":
        return detect_st_array(grid[:, 0], grid[:, 1])
    return None


def _pixel_size(meta: dict) -> float | None:
    for key in PIXEL_SIZE_KEYS:
        try:
            value = float(meta.get(key) or "nan")
        except (TypeError, ValueError):
            continue
        if value > 0:
            return value
    return None


def _grid_mpp(grid: np.ndarray, pixels: np.ndarray, array: str | None) -> float | None:
    from mclx.data.arrays import estimate_mpp

    return estimate_mpp(grid, pixels, array) if array else None


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of a WSI or plain image, from its header (PIL's, else OpenSlide's)."""
    from mclx.data.slide import image_size, open_slide

    try:
        return image_size(path)
    except DataError:
        pass
    slide = open_slide(path)
    try:
        return tuple(slide.dimensions)
    finally:
        slide.close()
