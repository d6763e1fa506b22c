"""Whole-slide inference: a slide file in, written predictions out.

Data flow, one module each::

    tiling (tissue mask, grid or spot tiles) -> plan (tile size, level, memory) ->
    prefetch (reader pool) -> runtime (encode, match against the bank) ->
    writer / outputs / geojson / sdata (the .h5ad, plots, GeoJSON, SpatialData);
    infer_state (--resume), cohort (many slides, local) and cohort_ray (Ray) on top.

Importing the package is cheap: its modules import torch, anndata and openslide inside
the functions that need them.
"""

from __future__ import annotations
