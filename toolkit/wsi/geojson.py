"""Predictions as GeoJSON that QuPath imports (File > Import objects, or drag and drop).

A FeatureCollection with one Feature per tile or spot: a Polygon in level-0 pixels (the
tile's square, or a 32-gon of the spot's real diameter around a spot), closed, its
exterior ring counterclockwise in the file's numbers (RFC 7946; y grows downwards on a
slide, so it looks clockwise there), and ``properties`` as QuPath reads them (0.3 and
later): ``objectType`` "detection" (so Measure > Show measurement maps colours them),
``name`` the observation id, and ``measurements`` the predicted genes
(``{"GENE": value}``, 7 significant digits).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

CIRCLE_VERTICES = 32


def top_genes(adata, n: int) -> list[str]:
    """The ``n`` genes with the highest mean prediction over the slide, highest first."""
    mean = np.asarray(adata.X, dtype=np.float64).mean(axis=0)
    order = np.argsort(-mean, kind="stable")[:n]
    return [str(adata.var_names[j]) for j in order]


def ring(x: float, y: float, size: float, shape: str) -> list[list[float]]:
    """The closed exterior ring of a tile (square of side ``size``) or spot (circle of
    diameter ``size``) centred at (x, y), counterclockwise in these numbers."""
    r = size / 2
    if shape == "circle":
        angles = [2 * math.pi * i / CIRCLE_VERTICES for i in range(CIRCLE_VERTICES)]
        pts = [[x + r * math.cos(a), y + r * math.sin(a)] for a in angles]
    else:
        pts = [[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r]]
    pts = [[round(px, 3), round(py, 3)] for px, py in pts]
    return [*pts, pts[0]]


def write_geojson(adata, path: str | os.PathLike, *, top: int | None = None) -> Path:
    """Write the predictions of ``adata`` as a QuPath-importable FeatureCollection; with
    ``top``, only the ``top`` genes of highest mean prediction are measurements."""
    from mclx.errors import DataError
    from mclx.files import atomic_path

    path = Path(path)
    genes = top_genes(adata, top) if top else [str(g) for g in adata.var_names]
    values = np.asarray(adata[:, genes].X, dtype=np.float32)
    if not np.isfinite(values).all():
        msg = f"{path}: the predictions hold NaN or infinite values; GeoJSON cannot carry them"
        raise DataError(msg)
    from mclx.wsi.writer import at_spots, spot_diameter

    shape = "circle" if at_spots(adata) else "square"
    size = (
        spot_diameter(adata) if shape == "circle" else float(adata.uns["mclx"]["tile_size_level0"])
    )
    keys = [json.dumps(g) for g in genes]
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type":"FeatureCollection","features":[\n')
        for i, name in enumerate(adata.obs_names):
            geometry = {"type": "Polygon", "coordinates": [ring(*xy[i], size, shape)]}
            measurements = ",".join(f"{k}:{v:.7g}" for k, v in zip(keys, values[i].tolist()))
            fh.write(
                f'{"," if i else ""}{{"type":"Feature","geometry":{json.dumps(geometry)},'
                f'"properties":{{"objectType":"detection","name":{json.dumps(str(name))},'
                f'"measurements":{{{measurements}}}}}}}\n'
            )
        fh.write("]}\n")
    return path
