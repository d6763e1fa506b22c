"""The paper's Table 1 metrics for one test section.

- ``pcc_acg``: mean over all considered genes of the Pearson correlation across spots
  between prediction and truth (genes with an undefined PCC, e.g. constant, dropped);
- ``pcc_heg``: the same over the 50 genes with the highest mean true expression;
- ``pcc_hvg``: the same over the 50 genes with the highest variance of the true
  expression across the section's spots (CMRCNet's HVG);
- ``mse``, ``mae``: over all spots and genes.
"""

from __future__ import annotations

import numpy as np


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each column (gene) across rows (spots), float64; NaN where undefined."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 2:
        msg = f"prediction {p.shape} and truth {t.shape} must be equal 2-d shapes"
        raise ValueError(msg)
    p = p - p.mean(0)
    t = t - t.mean(0)
    num = (p * t).sum(0)
    den = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[~np.isfinite(r)] = np.nan
    return np.clip(r, -1.0, 1.0)


def top_expressed(true: np.ndarray, n: int = 50) -> np.ndarray:
    """Indices of the ``n`` genes with highest mean true expression (descending)."""
    mean = np.asarray(true, dtype=np.float64).mean(0)
    return np.argsort(-mean, kind="stable")[: min(n, mean.size)]


def top_variable(true: np.ndarray, n: int = 50) -> np.ndarray:
    """Indices of the ``n`` genes with the highest variance of true expression (descending)."""
    var = np.asarray(true, dtype=np.float64).var(0)
    return np.argsort(-var, kind="stable")[: min(n, var.size)]


def _mean_pcc(r: np.ndarray) -> float:
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def score(pred: np.ndarray, true: np.ndarray, *, n_heg: int = 50) -> dict[str, float]:
    """The Table 1 metrics (and PCC over HVGs) plus the per-gene PCCs (``pcc_genes``)."""
    r = pearson_per_gene(pred, true)
    diff = np.asarray(pred, np.float64) - np.asarray(true, np.float64)
    return {
        "pcc_acg": _mean_pcc(r),
        "pcc_heg": _mean_pcc(r[top_expressed(true, n_heg)]),
        "pcc_hvg": _mean_pcc(r[top_variable(true, n_heg)]),
        "mse": float(np.mean(diff**2)),
        "mae": float(np.mean(np.abs(diff))),
        "pcc_genes": r,
    }
