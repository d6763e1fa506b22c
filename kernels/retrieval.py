"""Exact chunked cosine top-k, inverse-square-distance weights, weighted aggregation.

Cost model for Q queries, a bank of N keys of width D, k neighbours and G genes:
scores take 2·Q·N·D flops and read N·D key values; distances and aggregation touch
Q·k·(D + G) values. Keys are processed ``chunk`` rows at a time with a running top-k
merge, so scratch memory is O(Q·(chunk + k)), never O(Q·N).
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import numpy as np

Distance = Literal["l1", "l2"]
Weighting = Literal["inverse_square", "mean"]

DEFAULT_CHUNK_BYTES = 256 * 2**20  # scratch for one Q x chunk score block


def get_array_module(*arrays: Any):
    """``cupy`` when any input is a CuPy array (only if CuPy is already imported), else numpy."""
    cp = sys.modules.get("cupy")
    if cp is not None and any(isinstance(a, cp.ndarray) for a in arrays):
        return cp
    return np


def _check(queries, keys, k: int, values=None) -> None:
    if queries.ndim != 2 or keys.ndim != 2:
        msg = f"queries {queries.shape} and keys {keys.shape} must be 2-d"
        raise ValueError(msg)
    if keys.shape[0] == 0:
        msg = "the bank is empty (0 keys)"
        raise ValueError(msg)
    if queries.shape[1] != keys.shape[1]:
        msg = f"query width {queries.shape[1]} differs from key width {keys.shape[1]}"
        raise ValueError(msg)
    if not 1 <= k <= keys.shape[0]:
        msg = f"k={k} must be between 1 and the bank size {keys.shape[0]}"
        raise ValueError(msg)
    if values is not None and values.shape[0] != keys.shape[0]:
        msg = f"values have {values.shape[0]} rows but keys {keys.shape[0]}"
        raise ValueError(msg)
    xp = get_array_module(queries, keys)
    for name, a in (("queries", queries), ("keys", keys), ("values", values)):
        if a is not None and not bool(xp.isfinite(a).all()):
            msg = f"{name} contain NaN or infinite values"
            raise ValueError(msg)


def _normalize(x, xp):
    x = x.astype(xp.float32, copy=False)
    norm = xp.sqrt((x * x).sum(axis=1, keepdims=True))
    return x / xp.maximum(norm, xp.float32(1e-12))


def topk_cosine(queries, keys, k: int, chunk: int | None = None):
    """Exact top-``k`` keys by cosine similarity for every query.

    Args:
        queries: (Q, D) array; keys: (N, D) array (numpy or CuPy, same module).
        k: neighbours to keep, ``1 <= k <= N``.
        chunk: keys per block (default: ~256 MiB of float32 scores).

    Returns:
        ``(scores, indices)``, each (Q, k), sorted by decreasing score; ties go to the
        lower index.
    """
    _check(queries, keys, k)
    xp = get_array_module(queries, keys)
    q = _normalize(queries, xp)
    n = keys.shape[0]
    if chunk is None:
        chunk = max(k, DEFAULT_CHUNK_BYTES // (4 * max(len(q), 1)))
    chunk = max(int(chunk), 1)
    best_s = xp.full((len(q), 0), -xp.inf, dtype=xp.float32)
    best_i = xp.zeros((len(q), 0), dtype=xp.int64)
    for start in range(0, n, chunk):
        kc = _normalize(keys[start : start + chunk], xp)
        s = q @ kc.T
        idx = xp.broadcast_to(xp.arange(start, start + len(kc), dtype=xp.int64), s.shape)
        cand_s = xp.concatenate([best_s, s], axis=1)
        cand_i = xp.concatenate([best_i, idx], axis=1)
        if cand_s.shape[1] > k:
            part = xp.argpartition(-cand_s, k - 1, axis=1)[:, :k]
            cand_s = xp.take_along_axis(cand_s, part, axis=1)
            cand_i = xp.take_along_axis(cand_i, part, axis=1)
        best_s, best_i = cand_s, cand_i
    order = xp.lexsort(xp.stack([best_i, -best_s]), axis=-1) if xp is np else None
    if order is None:  # cupy.lexsort has no axis argument: sort by index, then stably by score
        o1 = xp.argsort(best_i, axis=1)
        best_s = xp.take_along_axis(best_s, o1, axis=1)
        best_i = xp.take_along_axis(best_i, o1, axis=1)
        order = xp.argsort(-best_s, axis=1, kind="stable")
    return xp.take_along_axis(best_s, order, axis=1), xp.take_along_axis(best_i, order, axis=1)


def neighbour_weights(dist, weighting: Weighting = "inverse_square"):
    """Rows of weights over k neighbours from their distances (Q, k), summing to 1.

    ``inverse_square``: ``d^-2 / sum d^-2``, computed as ``(d_min / d)^2`` normalised so
    nothing overflows; a row with exact matches (d = 0) shares all weight among them.
    ``mean``: uniform.
    """
    xp = get_array_module(dist)
    dist = dist.astype(xp.float64, copy=False)
    if weighting == "mean":
        return xp.full(dist.shape, 1.0 / dist.shape[1])
    if weighting != "inverse_square":
        msg = f"unknown weighting {weighting!r} (inverse_square or mean)"
        raise ValueError(msg)
    dmin = dist.min(axis=1, keepdims=True)
    exact = dmin == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        w = xp.where(exact, (dist == 0).astype(xp.float64), (dmin / dist) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def _distances(q, nb, distance: Distance, xp):
    diff = nb - q[:, None, :]
    if distance == "l2":
        return xp.sqrt((diff * diff).sum(axis=2))
    if distance == "l1":
        return xp.abs(diff).sum(axis=2)
    msg = f"unknown distance {distance!r} (l1 or l2)"
    raise ValueError(msg)


def aggregate(weights, indices, values):
    """``sum_j w_qj · values[indices_qj]`` for every query -> (Q, G) float32."""
    xp = get_array_module(weights, values)
    out = xp.einsum("qk,qkg->qg", weights, values[indices].astype(xp.float64))
    return out.astype(xp.float32)


def retrieve(
    queries,
    keys,
    values,
    k: int,
    *,
    distance: Distance = "l2",
    weighting: Weighting = "inverse_square",
    chunk: int | None = None,
    query_block: int = 1024,
):
    """Predict each query's expression from its top-``k`` cosine neighbours in the bank.

    Weights are ``d^-2`` normalised over the neighbours, ``d`` the L1 or L2 distance
    between the *unnormalised* embeddings; ``weighting="mean"`` averages (BLEEP).
    Queries are handled ``query_block`` at a time to bound the Q·k·G gather.

    Returns:
        (Q, G) float32 predictions.
    """
    _check(queries, keys, k, values)
    if distance not in ("l1", "l2"):
        msg = f"unknown distance {distance!r} (l1 or l2)"
        raise ValueError(msg)
    xp = get_array_module(queries, keys, values)
    out = []
    for start in range(0, len(queries), query_block):
        qb = queries[start : start + query_block]
        _, idx = topk_cosine(qb, keys, k, chunk)
        nb = keys[idx].astype(xp.float64)
        d = _distances(qb.astype(xp.float64), nb, distance, xp)
        out.append(aggregate(neighbour_weights(d, weighting), idx, values))
    if not out:
        return xp.zeros((0, values.shape[1]), dtype=xp.float32)
    return xp.concatenate(out, axis=0)


def retrieve_reference(queries, keys, values, k, *, distance="l2", weighting="inverse_square"):
    """Float64 brute force over the full Q x N similarity matrix, one query at a time."""
    q = np.asarray(queries, np.float64)
    kk = np.asarray(keys, np.float64)
    v = np.asarray(values, np.float64)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = kk / np.linalg.norm(kk, axis=1, keepdims=True)
    sims = qn @ kn.T
    preds = np.empty((len(q), v.shape[1]))
    indices = np.empty((len(q), k), dtype=np.int64)
    for i in range(len(q)):
        idx = np.lexsort((np.arange(len(kk)), -sims[i]))[:k]
        indices[i] = idx
        diff = kk[idx] - q[i]
        d = np.sqrt((diff**2).sum(1)) if distance == "l2" else np.abs(diff).sum(1)
        if weighting == "mean":
            w = np.full(k, 1.0 / k)
        elif (d == 0).any():
            w = (d == 0) / (d == 0).sum()
        else:
            w = d**-2.0 / (d**-2.0).sum()
        preds[i] = w @ v[idx]
    return preds, indices
