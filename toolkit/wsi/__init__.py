"""Whole-slide inference: a slide file in, written predictions out.

One engine (:mod:`.engine`: ``InferConfig``, ``SlideTask``, ``SlideEngine``) runs every
slide in stages, each stage one module::

    open: plan.locate (the slide's header, tiling: tissue mask, grid or spot tiles)
    -> plan (tile size, level, memory) -> read: prefetch (reader pool)
    -> encode, match: runtime (the encoder, retrieval against the bank)
    -> write: writer / outputs / geojson / sdata (the .h5ad, plots, GeoJSON, SpatialData)

infer_state keeps a run resumable (--resume); cohort (many slides on this process, each
an engine task) and cohort_ray (Ray Data, written by the engine) run cohorts.

Importing the package is cheap: its modules import torch, anndata and openslide inside
the functions that need them.
"""

from __future__ import annotations
