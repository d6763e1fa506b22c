"""The torch retrieval path: numpy arrays on the CPU (zero-copy ``torch.from_numpy``),
CuPy arrays and torch tensors on their device (zero-copy DLPack). It serves the CPU
without numba, every GPU bank the CuPy kernels do not take, and it is their oracle
(:func:`topk` and :func:`retrieve`, the torch path alone, are what
:mod:`mclx.kernels.gpu_select` checks itself against).

Keys are normalised a chunk at a time and scores made one block at a time, so scratch
stays within :data:`SCRATCH_BYTES`, never O(Q·N); ``torch.topk`` selects. In bf16 the
m = k + max(256, k/2) candidates are re-scored exactly, and a row the bound of
:mod:`mclx.kernels.bf16` cannot prove is redone in float32.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from mclx.kernels.bf16 import bf16_candidates, bf16_eps, bf16_sure
from mclx.kernels.stages import stage

Distance = Literal["l1", "l2"]
Weighting = Literal["inverse_square", "mean"]
Precision = Literal["auto", "fp32", "bf16"]

SCRATCH_BYTES = 256 * 2**20  # one Q x chunk score block
GATHER_BLOCK = 512  # queries whose neighbour vectors are gathered at once


def as_tensor(x: Any):
    """numpy -> CPU tensor, CuPy -> CUDA tensor (both zero-copy), tensors unchanged."""
    import torch

    if isinstance(x, torch.Tensor):
        return x
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(x, cp.ndarray):
        return torch.from_dlpack(x)
    return torch.from_numpy(np.ascontiguousarray(x))


def like(t, ref: Any):
    """Return tensor ``t`` as the array type of ``ref``: a CuPy ``ref`` gets a CuPy array
    (zero-copy from a CUDA tensor, copied from a CPU one: CuPy imports no host memory)."""
    import torch

    if isinstance(ref, torch.Tensor):
        return t
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(ref, cp.ndarray):
        if t.device.type == "cpu":  # CuPy queries against a host bank
            return cp.asarray(t.numpy())
        return cp.from_dlpack(t.contiguous())
    return t.cpu().numpy()


def check_inputs(q, keys, k: int, values=None) -> None:
    import torch

    if q.ndim != 2 or keys.ndim != 2:
        msg = f"queries {tuple(q.shape)} and keys {tuple(keys.shape)} must be 2-d"
        raise ValueError(msg)
    if keys.shape[0] == 0:
        msg = "the bank is empty (0 keys)"
        raise ValueError(msg)
    if q.shape[1] != keys.shape[1]:
        msg = f"query width {q.shape[1]} differs from key width {keys.shape[1]}"
        raise ValueError(msg)
    if not 1 <= k <= keys.shape[0]:
        msg = f"k={k} must be between 1 and the bank size {keys.shape[0]}"
        raise ValueError(msg)
    if values is not None and values.shape[0] != keys.shape[0]:
        msg = f"values have {values.shape[0]} rows but keys {keys.shape[0]}"
        raise ValueError(msg)
    if q.numel() and not bool(torch.isfinite(q).all()):
        msg = "queries contain NaN or infinite values"
        raise ValueError(msg)


def unit(x):
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _unit_chunk(keys, start: int, stop: int):
    import torch

    kc = unit(keys[start:stop])
    if not bool(torch.isfinite(kc.sum())):  # NaN/inf propagate; no bank-sized mask
        msg = f"keys contain NaN or infinite values (rows {start}-{stop - 1})"
        raise ValueError(msg)
    return kc


def _order(score, idx, k: int):
    """Permutation (Q, k) putting each row's best ``k`` first: score descending, then
    index ascending (deterministic ties)."""
    import torch

    o = torch.argsort(idx, dim=1)
    by_score = torch.argsort(torch.gather(score, 1, o), dim=1, descending=True, stable=True)
    return torch.gather(o, 1, by_score[:, :k])


def _merge(best_s, best_i, s, start: int, m: int):
    """Keep the ``m`` best of the running candidates and a new score block."""
    import torch

    top = min(m, s.shape[1])
    cs, ci = torch.topk(s, top, dim=1, sorted=False)
    ci = ci + start
    if best_s is None:
        return cs.float(), ci
    cs = torch.cat([best_s, cs.float()], 1)
    ci = torch.cat([best_i, ci], 1)
    if cs.shape[1] > m:
        cs, j = torch.topk(cs, m, dim=1, sorted=False)
        ci = torch.gather(ci, 1, j)
    return cs, ci


def _scan(qn, keys, m: int, chunk: int | None, dtype):
    """Running top-``m`` of ``qn @ unit(keys).T`` computed in ``dtype``; returns the
    scores, indices and the worst bf16 rounding error of a unit key.

    Default (``chunk=None``): when the normalised bank and a block of at least 64 query
    rows fit in the scratch budget, each query block is scored against the whole bank
    and reduced by one ``topk``; otherwise keys go ``chunk`` rows at a time with a
    running merge.
    """
    import torch

    n, width = keys.shape
    esize = 2 if dtype == torch.bfloat16 else 4
    rows = 2 * SCRATCH_BYTES // (esize * n)  # scores of one query block
    key_err = 0.0
    if chunk is None and n * width * esize <= SCRATCH_BYTES and rows >= 64:
        kc = _unit_chunk(keys, 0, n)
        kd = kc.to(dtype)
        if dtype == torch.bfloat16:
            key_err = float((kd.float() - kc).norm(dim=1).max())
        out_s, out_i = [], []
        for b in range(0, len(qn), rows):
            sc = qn[b : b + rows].to(dtype) @ kd.T
            top_s, top_i = torch.topk(sc, min(m, n), dim=1, sorted=False)
            out_s.append(top_s.float())
            out_i.append(top_i)
        return torch.cat(out_s), torch.cat(out_i), key_err
    if chunk is None:
        chunk = max(1024, SCRATCH_BYTES // (4 * max(len(qn), 1)))
    best_s = best_i = None
    qd = qn.to(dtype)
    for start in range(0, n, chunk):
        kc = _unit_chunk(keys, start, min(n, start + chunk))
        kd = kc.to(dtype)
        if dtype == torch.bfloat16:
            key_err = max(key_err, float((kd.float() - kc).norm(dim=1).max()))
        best_s, best_i = _merge(best_s, best_i, qd @ kd.T, start, m)
    return best_s, best_i, key_err


def _rerank(qn, keys, cand, block: int = GATHER_BLOCK):
    """Float32 cosine of each query with its candidate keys (Q, m), gathering the
    candidates ``block`` queries at a time to bound scratch memory."""
    import torch

    out = torch.empty(cand.shape, dtype=torch.float32, device=cand.device)
    for b in range(0, len(cand), block):
        c = cand[b : b + block]
        nb = unit(keys[c.reshape(-1)]).view(*c.shape, -1)
        out[b : b + block] = torch.bmm(nb, qn[b : b + block].unsqueeze(2)).squeeze(2)
    return out


def topk_torch(q, keys, k: int, chunk: int | None, mode: str):
    """(scores (Q, k) float32, indices (Q, k)) sorted, via ``torch.topk``."""
    import torch

    n, width = keys.shape
    qn = unit(q)
    if mode == "fp32" or n <= k:
        s, i, _ = _scan(qn, keys, k, chunk, torch.float32)
        o = _order(s, i, k)
        return torch.gather(s, 1, o), torch.gather(i, 1, o)
    m = min(n, bf16_candidates(k))
    approx, cand, key_err = _scan(qn, keys, m, chunk, torch.bfloat16)
    exact = _rerank(qn, keys, cand)
    o = _order(exact, cand, k)
    s, i = torch.gather(exact, 1, o), torch.gather(cand, 1, o)
    if m < n:
        top = torch.topk(approx.cpu(), k, dim=1).values[:, -1]
        eps = bf16_eps(qn.cpu(), width, key_err)
        unsure = torch.nonzero(~bf16_sure(top, approx.cpu().min(dim=1).values, eps))
        unsure = unsure.flatten().to(q.device)
        if len(unsure):
            s[unsure], i[unsure] = topk_torch(q[unsure], keys, k, chunk, "fp32")
    return s, i


def distances(q, keys, idx, distance: Distance):
    """L1 or L2 distances (Q, k) between queries and their neighbours, in float32 (relative
    error ~1e-7), gathered ``GATHER_BLOCK`` queries at a time and reduced in place."""
    import torch

    order = 2 if distance == "l2" else 1
    out = torch.empty(idx.shape, dtype=torch.float64, device=idx.device)
    for b in range(0, len(idx), GATHER_BLOCK):
        i = idx[b : b + GATHER_BLOCK]
        nb = keys[i.reshape(-1)].view(*i.shape, -1).float()
        nb.sub_(q[b : b + GATHER_BLOCK, None, :])
        out[b : b + GATHER_BLOCK] = torch.linalg.vector_norm(nb, ord=order, dim=2)
    return out


def neighbour_weights(dist, weighting: Weighting = "inverse_square"):
    """Weights over the k neighbours (Q, k) from their distances, each row summing to 1.

    ``inverse_square``: ``d^-2 / sum d^-2``, computed as ``(d_min / d)^2`` normalised so
    nothing overflows; a row with exact matches (d = 0) shares all weight among them.
    ``mean``: uniform.
    """
    import torch

    d = as_tensor(dist).double()
    if weighting == "mean":
        w = torch.full_like(d, 1.0 / d.shape[1])
    elif weighting == "inverse_square":
        dmin = d.min(dim=1, keepdim=True).values
        exact = (d == 0).double()
        w = torch.where(dmin == 0, exact, (dmin / d.clamp_min(1e-300)) ** 2)
    else:
        msg = f"unknown weighting {weighting!r} (inverse_square or mean)"
        raise ValueError(msg)
    return like(w / w.sum(dim=1, keepdim=True), dist)


def aggregate(weights, indices, values):
    """``sum_j w_qj · values[indices_qj]`` as a sparse (Q x N) @ (N x G) product, float32."""
    import torch

    w, idx, v = as_tensor(weights), as_tensor(indices), as_tensor(values)
    q, k = idx.shape
    crow = torch.arange(0, q * k + 1, k, device=idx.device, dtype=torch.int64)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        sparse = torch.sparse_csr_tensor(
            crow,
            idx.reshape(-1).long(),
            w.reshape(-1).float(),
            size=(q, v.shape[0]),
            check_invariants=False,
        )
        return like(sparse @ v.float(), values)


def neighbours(q, keys, k: int, chunk: int | None, mode: str, distance: str):
    """Sorted top-``k`` (scores, indices, distances) of tensors ``q`` against ``keys``."""
    s, idx = topk_torch(q, keys, k, chunk, mode)
    return s, idx, distances(q.float(), keys, idx, distance)


def retrieve_blocks(
    q, keys, values, *, neighbours: Callable, aggregate: Callable, weighting: str,
    query_block: int,
):  # fmt: skip
    """Predictions (Q, G) of checked tensors, ``query_block`` queries at a time:
    ``neighbours(block) -> (scores, indices, distances)``, weights, then
    ``aggregate(weights, indices, values)``."""
    import torch

    out = []
    for start in range(0, len(q), query_block):
        _, idx, dist = neighbours(q[start : start + query_block])
        with stage("weights"):
            w = neighbour_weights(dist, weighting)
        with stage("aggregate"):
            out.append(aggregate(w, idx, values))
    pred = torch.cat(out) if out else torch.zeros((0, values.shape[1]), device=values.device)
    if not bool(torch.isfinite(pred).all()):
        msg = "values contain NaN or infinite values in rows chosen as neighbours"
        raise ValueError(msg)
    return pred


def _mode(precision: str) -> str:
    if precision not in ("fp32", "bf16"):
        msg = f"unknown precision {precision!r} (fp32 or bf16)"
        raise ValueError(msg)
    return precision


def on_tensors(queries, keys, k: int, values=None, *, call: Callable):
    """The torch path's way in and out, for every caller: ``keys`` (and ``values``) as
    tensors, ``queries`` as a tensor on the keys' device (host queries against a
    device-resident bank), all checked (:func:`check_inputs`); ``call(q, keys, values)``
    under ``torch.inference_mode``; its tensor, or each of a tuple of them, back as the
    queries' array type."""
    import torch

    kk = as_tensor(keys)
    v = None if values is None else as_tensor(values)
    q = as_tensor(queries).to(kk.device)
    check_inputs(q, kk, k, v)
    with torch.inference_mode():
        out = call(q, kk, v)
    if isinstance(out, tuple):
        return tuple(like(t, queries) for t in out)
    return like(out, queries)


def topk(queries, keys, k: int, chunk: int | None = None, *, precision: str = "fp32"):
    """:func:`mclx.kernels.topk_cosine` on the torch path alone (``fp32`` or ``bf16``)."""
    mode, chunk = _mode(precision), None if chunk is None else max(int(chunk), 1)
    return on_tensors(queries, keys, k, call=lambda q, kk, _: topk_torch(q, kk, k, chunk, mode))


def retrieve(
    queries, keys, values, k: int, *, distance: str = "l2", weighting: str = "inverse_square",
    chunk: int | None = None, precision: str = "fp32", query_block: int = 16384,
):  # fmt: skip
    """:func:`mclx.kernels.retrieve` on the torch path alone (``fp32`` or ``bf16``)."""
    mode, chunk = _mode(precision), None if chunk is None else max(int(chunk), 1)
    return on_tensors(
        queries, keys, k, values,
        call=lambda q, kk, v: retrieve_blocks(
            q, kk, v, weighting=weighting, query_block=query_block, aggregate=aggregate,
            neighbours=lambda qb: neighbours(qb, kk, k, chunk, mode, distance),
        ),
    )  # fmt: skip
