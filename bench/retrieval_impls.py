"""The implementations the kernel is compared against, written as their sources do."""

from __future__ import annotations

import numpy as np

from mclx.kernels import aggregate, neighbour_weights


def reference_loop(queries: np.ndarray, keys: np.ndarray, values: np.ndarray, k: int):
    """mclSTExp's evaluation: full Q x N similarity, torch.topk, then a Python loop of
    inverse-square-distance weighted averages per query."""
    import torch
    import torch.nn.functional as F

    q = F.normalize(torch.from_numpy(queries), dim=-1)
    kk = F.normalize(torch.from_numpy(keys), dim=-1)
    _, idx = torch.topk(q @ kk.T, k=k, dim=1)
    idx = idx.numpy()
    preds = np.empty((len(queries), values.shape[1]), np.float32)
    for i in range(len(queries)):
        d = np.linalg.norm(keys[idx[i]] - queries[i], axis=1)
        w = np.reciprocal(d**2)
        preds[i] = np.average(values[idx[i]], weights=w / w.sum(), axis=0)
    return preds


def faiss_exact(queries: np.ndarray, keys: np.ndarray, values: np.ndarray, k: int):
    """FAISS exact inner-product search on unit vectors, then the kernel's aggregation."""
    import faiss

    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(kn)
    _, idx = index.search(qn, k)
    nb = keys[idx]
    d = np.sqrt(((nb - queries[:, None, :]) ** 2).sum(2))
    return aggregate(neighbour_weights(d), idx, values)


def unit_rows(x: np.ndarray, dtype):
    """Unit rows of ``x`` as a torch tensor of ``dtype``, in blocks (no float64 copy)."""
    import torch

    out = torch.empty(x.shape, dtype=dtype)
    for s in range(0, len(x), 65536):
        b = torch.from_numpy(x[s : s + 65536])
        out[s : s + 65536] = (b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(dtype)
    return out


def tiled_product(q, kd) -> None:
    """The score product alone, as the CPU kernel makes it: ``torch.mm`` of unit queries
    by unit keys (prepared before, in the kernel's dtype) into one reused score tile of
    the kernel's shape; the floor that any exact retrieval pays."""
    import torch

    from mclx.kernels import retrieval as kr

    cols = min(len(kd), kr.TILE_COLS)
    rows = max(1, kr.TILE_BYTES // (kd.element_size() * cols))
    tile = torch.empty(rows * cols, dtype=kd.dtype)
    for b in range(0, len(q), rows):
        qb = q[b : b + rows]
        for c in range(0, len(kd), cols):
            kt = kd[c : c + cols]
            torch.mm(qb, kt.T, out=tile[: len(qb) * len(kt)].view(len(qb), len(kt)))
