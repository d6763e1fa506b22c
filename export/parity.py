"""Agreement of an exported encoder with PyTorch FP32 on the same patches."""

from __future__ import annotations

import numpy as np


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """``max_rel_err``: max |a - b| over max |a|; ``min_cosine``: worst per-row cosine."""
    ref = np.asarray(reference, np.float64)
    got = np.asarray(candidate, np.float64)
    if ref.shape != got.shape:
        msg = f"embedding shapes differ: {ref.shape} vs {got.shape}"
        raise ValueError(msg)
    rel = float(np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-12))
    num = (ref * got).sum(1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = num / np.maximum(den, 1e-12)
    return {"max_rel_err": rel, "min_cosine": float(cos.min()), "n": int(len(ref))}
