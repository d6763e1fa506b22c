"""Independent oracles: expected values computed without mclx's inference layer.

Every function here works in float64 from first principles (numpy, or the model's own
torch modules called directly on hand-made inputs) so that a test compares mclx against
something that cannot share its bugs: the spot-encoder chunking, the pixel transform,
the retrieval and its weights, the expression normalisation.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def normalised_expression(adata, genes: Sequence[str], log_base: str = "10") -> np.ndarray:
    """``log(1 + 1e4 x / sum(x))`` over ``genes`` (library size over those genes only;
    all-zero spots stay zero), float64."""
    sub = adata[:, list(genes)].X
    raw = np.asarray(sub.toarray() if hasattr(sub, "toarray") else sub, np.float64)
    lib = raw.sum(1, keepdims=True)
    scaled = np.divide(raw * 1e4, lib, out=np.zeros_like(raw), where=lib > 0)
    return np.log10(1 + scaled) if log_base == "10" else np.log1p(scaled)


def _f64(model):
    """A float64 copy of ``model`` in eval mode (the original is left as it is)."""
    return copy.deepcopy(model).cpu().double().eval()


def spot_embeddings_f64(
    model,
    sections: Mapping[str, Any],
    genes: Sequence[str],
    log_base: str = "10",
    *,
    seq_len: int | None = None,
) -> np.ndarray:
    """Spot embeddings of every spot of ``sections`` (name -> AnnData, in that order),
    float64: each section cut by hand into consecutive runs of ``seq_len`` (default
    ``model.cfg.seq_len``) spots, the whole section in ``section`` context, each run
    through the model's ``spot_encoder`` and ``spot_projection`` directly."""
    import torch

    m = _f64(model)
    seq_len = seq_len or model.cfg.seq_len
    out = []
    for adata in sections.values():
        expr = normalised_expression(adata, genes, log_base)
        pos = adata.obs[["x", "y"]].to_numpy(np.int64)
        step = len(expr) if model.cfg.context == "section" else seq_len
        with torch.no_grad():
            for start in range(0, len(expr), step):
                x = torch.from_numpy(expr[start : start + step])
                p = torch.from_numpy(pos[start : start + step])
                out.append(m.spot_projection(m.spot_encoder(x, p)).numpy())
    return np.concatenate(out)


def image_outputs_f64(model, patches: np.ndarray, pre, *, batch: int = 16) -> np.ndarray:
    """The model's image output (embeddings, or ST-Net's expression) of uint8 NHWC
    patches, float64: pixels scaled to [0, 1] then ``(x - mean) / std`` by hand (the RGB
    mean and std for each 3-channel view: a ``--context-fov`` model's patches hold two)."""
    import torch

    m = _f64(model)
    views = patches.shape[-1] // 3
    mean = np.tile(np.asarray(pre.mean, np.float64), views)[None, :, None, None]
    std = np.tile(np.asarray(pre.std, np.float64), views)[None, :, None, None]
    out = []
    with torch.no_grad():
        for s in range(0, len(patches), batch):
            x = patches[s : s + batch].astype(np.float64).transpose(0, 3, 1, 2) / 255.0
            x = np.ascontiguousarray((x - mean) / std)
            out.append(m(torch.from_numpy(x)).numpy())
    return np.concatenate(out)


@dataclass
class Retrieval:
    """What :func:`knn_predict` found: predictions (Q, G) float64, the neighbours
    (Q, k), and each query's margin, the cosine gap between its k-th and (k+1)-th
    neighbours (inf when k is the whole bank): below float32's resolution the two
    could swap in a float32 run."""

    pred: np.ndarray
    idx: np.ndarray
    margin: np.ndarray

    def sure(self, tol: float = 1e-4) -> np.ndarray:
        """Queries whose neighbour set float32 cannot change (margin above ``tol``)."""
        return self.margin > tol


def knn_predict(
    queries, keys, values, k: int, *, distance: str = "l2", weighting: str = "inverse_square"
) -> Retrieval:
    """mclSTExp's retrieval in a few lines of float64 numpy: cosine top-``k`` (ties to
    the lower index), then the ``d^-2``-weighted mean (``d`` the L1 or L2 distance of the
    raw embeddings; exact matches share all weight) or the plain mean of their values."""
    q = np.asarray(queries, np.float64)
    kk = np.asarray(keys, np.float64)
    v = np.asarray(values, np.float64)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        kk / np.linalg.norm(kk, axis=1, keepdims=True)
    ).T
    order = np.argsort(-cos, axis=1, kind="stable")
    idx = order[:, :k]
    ranked = np.take_along_axis(cos, order, axis=1)
    margin = ranked[:, k - 1] - ranked[:, k] if k < len(kk) else np.full(len(q), np.inf)
    diff = kk[idx] - q[:, None, :]
    d = np.sqrt((diff**2).sum(2)) if distance == "l2" else np.abs(diff).sum(2)
    if weighting == "mean":
        w = np.full(d.shape, 1.0 / k)
    else:
        zero = d == 0
        with np.errstate(divide="ignore"):
            w = np.where(zero.any(1, keepdims=True), zero, d**-2.0)
        w = w / w.sum(1, keepdims=True)
    return Retrieval(np.einsum("qk,qkg->qg", w, v[idx]), idx, margin)
