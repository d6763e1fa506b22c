"""Predictions as a SpatialData store (``.zarr``), for napari-spatialdata and scverse tools.

Three elements in one coordinate system, ``global``, in the slide's level-0 pixels:

- images ``{LIB}_image``: the slide as ``uns["spatial"]`` holds it (downscaled, longer side
  2000 px), with the scale that maps it onto level 0;
- shapes ``{LIB}_tiles``: one square per tile (polygons) or one circle per spot (points
  with the radius of the real spot), indexed by instance id 0..n-1;
- tables ``table``: the predictions (AnnData), annotating the shapes through
  ``obs["region"]`` (the shapes' name) and ``obs["instance_id"]``.

Needs the optional extra: ``pip install 'mclx[spatialdata]'``.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np

EXTRA = "pip install 'mclx[spatialdata]'"


def require_spatialdata(option: str = "--spatialdata") -> None:
    """Fail before any work when spatialdata is not installed."""
    from mclx.extras import MissingExtra, installed

    if not installed("spatialdata"):
        msg = f"{option}: spatialdata is not installed (an optional extra: {EXTRA})"
        raise MissingExtra(msg)


def _shapes(adata, region: str):
    import geopandas as gpd
    from shapely import box, points
    from spatialdata.models import ShapesModel

    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    size = float(adata.uns["mclx"]["tile_size_level0"])
    index = np.arange(adata.n_obs)
    if str(adata.uns["mclx"].get("tiles_from", "")).startswith("spots"):  # the real spot
        d = float(adata.uns["mclx"].get("spot_diameter_level0", size))
        gdf = gpd.GeoDataFrame({"radius": np.full(len(xy), d / 2)}, geometry=points(xy))
    else:
        r = size / 2
        gdf = gpd.GeoDataFrame(geometry=box(xy[:, 0] - r, xy[:, 1] - r, xy[:, 0] + r, xy[:, 1] + r))
    gdf.index = index
    return ShapesModel.parse(gdf)


def _image(adata):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    from mclx.wsi.writer import hires_image

    found = hires_image(adata)
    if found is None:
        msg = "predictions without uns['spatial'] (the slide image); cannot write SpatialData"
        raise ValueError(msg)
    img, f = found
    return Image2DModel.parse(
        np.ascontiguousarray(np.moveaxis(img, -1, 0)),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={"global": Scale([f, f], axes=("y", "x"))},
    )


def write_spatialdata(adata, path: str | os.PathLike, *, library: str) -> Path:
    """Write ``adata`` (mclx predictions with ``uns["spatial"]``) as a SpatialData store."""
    import pandas as pd
    import spatialdata as sd
    from spatialdata.models import TableModel

    from mclx.files import atomic_folder

    path = Path(path)
    region = f"{library}_tiles"
    table = adata.copy()
    del table.uns["spatial"]  # the image is an element of its own
    table.obs["region"] = pd.Categorical([region] * table.n_obs)
    table.obs["instance_id"] = np.arange(table.n_obs)
    table = TableModel.parse(table, region=region, region_key="region", instance_key="instance_id")
    sdata = sd.SpatialData(
        images={f"{library}_image": _image(adata)},
        shapes={region: _shapes(adata, region)},
        tables={"table": table},
    )
    with atomic_folder(path) as tmp, warnings.catch_warnings():
        # zarr announces a future default on every array it writes
        warnings.filterwarnings("ignore", message=".*autosharding", category=UserWarning)
        shutil.rmtree(tmp)  # spatialdata creates the store itself
        sdata.write(tmp)
    return path
