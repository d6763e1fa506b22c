"""Random banks and queries for the retrieval benchmarks (and ``peak_memory.py``)."""

from __future__ import annotations

import numpy as np


def random_bank(n: int, d: int = 256, g: int = 785, seed: int = 0):
    """float32 keys (N, D) and non-negative values (N, G), generated in place in blocks
    so that no float64 temporary inflates the process's peak memory."""
    rng = np.random.default_rng(seed)
    keys = np.empty((n, d), np.float32)
    values = np.empty((n, g), np.float32)
    for s in range(0, n, 65536):
        rng.standard_normal(out=keys[s : s + 65536], dtype=np.float32)
        block = values[s : s + 65536]
        rng.random(out=block, dtype=np.float32)
        np.multiply(block, 3.0, out=block)
    return keys, values


def random_queries(q: int = 4096, d: int = 256, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((q, d), dtype=np.float32)
