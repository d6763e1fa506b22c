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
