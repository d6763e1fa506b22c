"""A spot's neighbourhood and wider field of view (issue #28), joined to its frozen features.

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

The mean blurs a spot's own signal into its neighbours'. Two options keep it apart by
joining blocks of encoder width along the feature axis, in this fixed order:

- ``[own]``: the spot's own features (always);
- ``[wide]``: ``context_fov_um = W`` (``--context-fov W``), TRIPLEX's wider field of
  view: a second crop of W µm around the spot (on the section's own µm/px, zero beyond
  the image's border), resized to the patch size and encoded by the same frozen encoder
  (its own entry of the feature cache);
- ``[neighbourhood]``: ``context_mode = "concat"`` (``--context-mode concat``) with a
  radius: the weighted mean above over the OTHER spots within R (a spot with none: its
  own features).

With ``context_mode = "mean"`` (the default) and a wider field of view, both the own and
the wide block are pooled. The heads size from the joined width
(:func:`mclx.models.backbones.feature_width`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# the default recipe's wider field of view for mclstexp with a frozen encoder, in µm a side
# (3x the 154 µm of her2st's 224 px patches; won the recipe rule, docs/results.md)
DEFAULT_FOV_UM = 461.0


def neighbour_weights(xy_um: np.ndarray, radius_um: float, *, include_self: bool = True):
    """Row-normalised weights (N, N) as a scipy CSR matrix: row ``i`` weights the spots
    within ``radius_um`` of spot ``i`` by ``exp(-2 (d / R)^2)``, itself included; with
    ``include_self=False`` only the others (a spot with none keeps weight 1 on itself)."""
    from scipy import sparse
    from scipy.spatial import cKDTree

    xy = np.asarray(xy_um, np.float64).reshape(-1, 2)
    if not radius_um > 0:
        msg = f"the context radius must be positive (µm), not {radius_um}"
        raise ValueError(msg)
    n = len(xy)
    near = cKDTree(xy).query_ball_point(xy, radius_um)  # every spot finds itself
    if not include_self:
        near = [[j for j in js if j != i] or [i] for i, js in enumerate(near)]
    rows = np.repeat(np.arange(n), [len(j) for j in near])
    cols = np.concatenate([np.asarray(j, np.int64) for j in near]) if n else rows
    d = np.linalg.norm(xy[rows] - xy[cols], axis=1)
    w = np.exp(-2.0 * (d / radius_um) ** 2)
    mat = sparse.csr_matrix((w, (rows, cols)), shape=(n, n))
    norm = np.asarray(mat.sum(axis=1)).ravel()
    return sparse.diags(1.0 / norm) @ mat


def pool(
    features: np.ndarray, xy_um: np.ndarray, radius_um: float, *, include_self: bool = True
) -> np.ndarray:
    """``features`` (N, ...) of one section's spots at ``xy_um`` (N, 2), pooled over each
    spot's neighbourhood (:func:`neighbour_weights`); same shape and dtype."""
    feats = np.asarray(features)
    if len(feats) != len(xy_um):
        msg = f"{len(feats)} feature rows for {len(xy_um)} positions"
        raise ValueError(msg)
    if len(feats) == 0:
        return feats
    flat = feats.reshape(len(feats), -1).astype(np.float64)
    out = neighbour_weights(xy_um, radius_um, include_self=include_self) @ flat
    return np.asarray(out, dtype=feats.dtype).reshape(feats.shape)


def section_xy_um(adata) -> np.ndarray:
    """A section's spot centres in µm: pixel coordinates of its image times its µm/px."""
    mpp = adata.uns.get("mpp")
    if not mpp:
        name = adata.uns.get("image_path") or adata.uns.get("section")
        msg = f"{name}: the section's µm/px is unknown, so a context radius in µm has no scale"
        raise ValueError(msg)
    return np.asarray(adata.obsm["spatial"], np.float64) * float(mpp)


def radius_um(model_cfg) -> float:
    """The context radius in µm that ``model_cfg`` asks for (0: none)."""
    return float(getattr(model_cfg, "context_radius_um", 0.0) or 0.0)


def radius(model) -> float:
    """The model's context radius in µm (0: none)."""
    return radius_um(model.cfg)


def fov(model_cfg) -> float:
    """The model's wider field of view in µm (0: none)."""
    return float(getattr(model_cfg, "context_fov_um", 0.0) or 0.0)


def options(model_cfg) -> list[str]:
    """The context options ``model_cfg`` was made with, as the command line names them
    (``--context-radius 400``, ``--context-mode concat``, ``--context-fov 540``)."""
    out = []
    r = radius_um(model_cfg)
    if r:
        out.append(f"--context-radius {r:g}")
    if getattr(model_cfg, "context_mode", "mean") != "mean":
        out.append(f"--context-mode {model_cfg.context_mode}")
    if fov(model_cfg):
        out.append(f"--context-fov {fov(model_cfg):g}")
    return out


def check(model_cfg) -> None:
    """Refuse context settings that mean nothing (one line)."""
    mode = getattr(model_cfg, "context_mode", "mean")
    if mode not in ("mean", "concat"):
        msg = f"--context-mode: {mode!r} is not one of mean, concat"
        raise ValueError(msg)
    r = radius_um(model_cfg)
    if mode == "concat" and not r:
        msg = "--context-mode concat joins the neighbourhood of --context-radius: give a radius"
        raise ValueError(msg)
    if fov(model_cfg) < 0:
        msg = f"--context-fov must be a positive field of view in µm, not {fov(model_cfg):g}"
        raise ValueError(msg)


def section_features(cache, model, section: str, pre, **kw: Any) -> np.ndarray:
    """``section``'s frozen features as ``model`` reads them: the cache's
    (:meth:`~mclx.training.features.PatchCache.features`, ``kw`` passed on), joined
    along the last axis as ``[own, wide, neighbourhood]`` (the module's docstring)."""
    cfg, enc = model.cfg, model.image_encoder
    check(cfg)
    views = [cache.features(enc, section, pre, **kw)]
    if fov(cfg):
        views.append(cache.features(enc, section, pre, fov_um=fov(cfg), **kw))
    xy = section_xy_um(cache.adatas[section]) if radius(model) else None
    return join(views, xy, cfg)


def join(views: list[np.ndarray], xy_um: np.ndarray | None, model_cfg) -> np.ndarray:
    """The features of one region's spots (or tiles) as a model reads them, from the
    encoder's features of each view (``[own]``, or ``[own, wide]``): with a radius, each
    view pooled over the neighbourhood (``mean``) or the own view's neighbourhood
    appended (``concat``), at centres ``xy_um`` (N, 2) in µm; joined along the last
    axis. Training, ``mclx evaluate`` and the whole-slide runtime's region step
    (:mod:`mclx.wsi.region`) all call it."""
    r = radius_um(model_cfg)
    parts = list(views)
    if r:
        if getattr(model_cfg, "context_mode", "mean") == "concat":
            parts.append(pool(views[0], xy_um, r, include_self=False))
        else:
            parts = [pool(p, xy_um, r) for p in parts]
    return np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def require_none(model_cfg, where: str, what: str) -> None:
    """Refuse, in one line, to run a model trained with a context radius where
    neighbourhoods are not pooled (it would silently predict from other inputs). A wider
    field of view alone is part of the model's input (``PreprocessCfg.views_um``:
    every reader cuts it), so it runs anywhere."""
    opts = [o for o in options(model_cfg) if not o.startswith("--context-fov")]
    if opts:
        msg = (
            f"{where}: the model was trained with {' '.join(opts)}; {what} does "
            "not join spot neighbourhoods, so it cannot run this model"
        )
        raise ValueError(msg)
