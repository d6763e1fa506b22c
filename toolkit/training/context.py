"""A spot's neighbourhood (issue #28): its frozen features pooled with its neighbours'.

Expression is spatially autocorrelated and a spot's own patch is not all an image says
about it. With ``context_radius_um = R`` (``--context-radius R``) every model reads, in
place of a spot's pooled encoder features ``f_i``, their distance-weighted mean over the
spots within ``R`` µm of it, itself included:

    g_i = sum_j w_ij f_j / sum_j w_ij,   w_ij = exp(-2 (d_ij / R)^2)  for d_ij <= R

(a Gaussian of sigma R / 2: weight 1 for the spot itself, 0.14 at the radius). Distances
are in µm, from pixel coordinates times the section's µm/px, so one radius covers the
same tissue on every scan. The weights sum to one, so the features keep their scale, and
every model (mclstexp, bleep, stnet, knn, ridge, the section models) reads them through
its usual input: the cached features of a section are pooled after encoding and before
the heads, in training, in each fold of ``mclx evaluate`` and for a knn bank's keys.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def neighbour_weights(xy_um: np.ndarray, radius_um: float):
    """Row-normalised weights (N, N) as a scipy CSR matrix: row ``i`` weights the spots
    within ``radius_um`` of spot ``i`` (itself included) by ``exp(-2 (d / R)^2)``."""
    from scipy import sparse
    from scipy.spatial import cKDTree

    xy = np.asarray(xy_um, np.float64).reshape(-1, 2)
    if not radius_um > 0:
        msg = f"the context radius must be positive (µm), not {radius_um}"
        raise ValueError(msg)
    n = len(xy)
    near = cKDTree(xy).query_ball_point(xy, radius_um)  # every spot finds itself
    rows = np.repeat(np.arange(n), [len(j) for j in near])
    cols = np.concatenate([np.asarray(j, np.int64) for j in near]) if n else rows
    d = np.linalg.norm(xy[rows] - xy[cols], axis=1)
    w = np.exp(-2.0 * (d / radius_um) ** 2)
    mat = sparse.csr_matrix((w, (rows, cols)), shape=(n, n))
    norm = np.asarray(mat.sum(axis=1)).ravel()
    return sparse.diags(1.0 / norm) @ mat


def pool(features: np.ndarray, xy_um: np.ndarray, radius_um: float) -> np.ndarray:
    """``features`` (N, ...) of one section's spots at ``xy_um`` (N, 2), pooled over each
    spot's neighbourhood (:func:`neighbour_weights`); same shape and dtype."""
    feats = np.asarray(features)
    if len(feats) != len(xy_um):
        msg = f"{len(feats)} feature rows for {len(xy_um)} positions"
        raise ValueError(msg)
    if len(feats) == 0:
        return feats
    flat = feats.reshape(len(feats), -1).astype(np.float64)
    out = neighbour_weights(xy_um, radius_um) @ flat
    return np.asarray(out, dtype=feats.dtype).reshape(feats.shape)


def section_xy_um(adata) -> np.ndarray:
    """A section's spot centres in µm: pixel coordinates of its image times its µm/px."""
    mpp = adata.uns.get("mpp")
    if not mpp:
        name = adata.uns.get("image_path") or adata.uns.get("section")
        msg = f"{name}: the section's µm/px is unknown, so a context radius in µm has no scale"
        raise ValueError(msg)
    return np.asarray(adata.obsm["spatial"], np.float64) * float(mpp)


def radius(model) -> float:
    """The model's context radius in µm (0: none)."""
    return float(getattr(model.cfg, "context_radius_um", 0.0) or 0.0)


def section_features(cache, model, section: str, pre, **kw: Any) -> np.ndarray:
    """``section``'s frozen features as ``model`` reads them: the cache's
    (:meth:`~mclx.training.features.PatchCache.features`, ``kw`` passed on), pooled over
    each spot's neighbourhood when the model has a context radius."""
    feats = cache.features(model.image_encoder, section, pre, **kw)
    r = radius(model)
    return pool(feats, section_xy_um(cache.adatas[section]), r) if r else feats


def require_none(model_cfg, where: str, what: str) -> None:
    """Refuse, in one line, to run a model trained with a context radius where the
    neighbourhood is not applied (it would silently predict from other inputs)."""
    r = float(getattr(model_cfg, "context_radius_um", 0.0) or 0.0)
    if r:
        msg = (
            f"{where}: the model was trained with --context-radius {r:g} (µm); {what} does "
            "not pool spot neighbourhoods yet, so it cannot run this model"
        )
        raise ValueError(msg)
