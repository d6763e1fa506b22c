"""Exact chunked cosine top-k, inverse-square-distance weights, weighted aggregation: the
public API, and which path serves a call.

One interface serves every array type, and the result comes back as the caller's (the
queries') array type. A bank of CuPy arrays runs the CuPy kernels of
:mod:`mclx.kernels.gpu_select` (cuBLAS scores, CUDA selection, re-scoring and
aggregation) once they have passed their self-check on that GPU; a CPU bank runs the
compiled path (:mod:`mclx.kernels.compiled_path`: torch products, numba selection) where
numba imports; everything else, and the CuPy case when the kernels step aside, runs the
torch path (:mod:`mclx.kernels.torch_path`), the fallback and the kernels' oracle.

Cost for Q queries, a bank of N keys of width D, k neighbours and G genes: scores take
2·Q·N·D flops and read N·D key values; selection reads Q·N scores once; re-scoring,
distances and aggregation touch O(Q·k·(D + G)) values. Keys are normalised a chunk at a
time and scores made one tile at a time, so scratch stays within a fixed budget, never
O(Q·N).

``precision="bf16"`` makes the scores in bfloat16 and re-scores its candidates exactly,
so the result is the float32 one (:mod:`mclx.kernels.bf16`). ``auto`` picks bf16 on CPUs
with AMX when the bank is large next to the candidates (N > 32m), float32 elsewhere.
Stage timers: :mod:`mclx.kernels.stages`.
"""

from __future__ import annotations

import sys

import numpy as np

from mclx.kernels.bf16 import BF16_U, bf16_candidates, bf16_sure, cpu_flags, cpu_has_fast_bf16
from mclx.kernels.compiled_path import aggregate_compiled, compiled_available, neighbours_compiled
from mclx.kernels.stages import stage_times
from mclx.kernels.torch_path import (
    Distance,
    Precision,
    Weighting,
    aggregate,
    neighbour_weights,
    on_tensors,
    retrieve_blocks,
)
from mclx.kernels.torch_path import neighbours as torch_neighbours

__all__ = [
    "BF16_U",
    "Distance",
    "Precision",
    "Weighting",
    "aggregate",
    "bf16_sure",
    "compiled_available",
    "cpu_has_fast_bf16",
    "neighbour_weights",
    "retrieve",
    "retrieve_reference",
    "stage_times",
    "topk_cosine",
]


def _resolve_precision(precision: Precision, device, n: int = 0, k: int = 0) -> str:
    if precision == "auto":
        # measured (bench/test_retrieval.py, Q = 4096, k = 200): bf16 candidates + exact
        # re-scoring beat float32 on AMX once the bank is large next to the candidates
        # (N = 200k: 2-4x); at N = 13,620 the m = k + 256 re-scored candidates cost more
        # than the product saves. Elsewhere float32 (on GPU the products are cheap).
        fast = device.type == "cpu" and "amx_bf16" in cpu_flags() and compiled_available()
        return "bf16" if fast and n > 32 * bf16_candidates(k) else "fp32"
    if precision not in ("fp32", "bf16"):
        msg = f"unknown precision {precision!r} (auto, fp32 or bf16)"
        raise ValueError(msg)
    return precision


def _neighbours(q, keys, k: int, chunk, precision: Precision, distance: Distance):
    """Sorted top-``k`` (scores, indices, distances) of every query, on the keys' device."""
    mode = _resolve_precision(precision, keys.device, len(keys), k)
    if chunk is not None:
        chunk = max(int(chunk), 1)
    order = 2 if distance == "l2" else 1
    if keys.device.type == "cpu" and compiled_available():
        cos, idx, dist = neighbours_compiled(q, keys, k, chunk, mode, order)
        return cos.float(), idx, dist
    return torch_neighbours(q, keys, k, chunk, mode, distance)


def _on_cupy(keys, k: int, precision: str):
    """``(gpu_select, mode)`` when ``keys`` are a CuPy array that the CuPy kernels serve
    (:mod:`mclx.kernels.gpu_select`: they passed their self-check on that GPU and the
    candidates fit their buffers); None: the torch path. ``auto`` is float32 on a GPU
    (the products are cheap there); bf16 gives the float32 result, so where its
    candidates do not fit, float32 answers instead."""
    cp = sys.modules.get("cupy")
    if cp is None or not isinstance(keys, cp.ndarray) or keys.ndim != 2 or not len(keys):
        return None
    if precision not in ("auto", "fp32", "bf16"):
        msg = f"unknown precision {precision!r} (auto, fp32 or bf16)"
        raise ValueError(msg)
    from mclx.kernels import gpu_select

    n = len(keys)
    modes = ("bf16", "fp32") if precision == "bf16" else ("fp32",)
    mode = next((m for m in modes if gpu_select.supports(k, n, m)), None)
    if mode is None or not 1 <= k <= n or not gpu_select.usable(keys.device.id):
        return None
    return gpu_select, mode


def topk_cosine(queries, keys, k: int, chunk: int | None = None, *, precision: Precision = "auto"):
    """Exact top-``k`` keys by cosine similarity for every query.

    Args:
        queries: (Q, D) numpy, CuPy or torch array; keys: (N, D) of the same kind.
        k: neighbours to keep, ``1 <= k <= N``.
        chunk: keys scored per block (default: a fixed scratch budget).
        precision: ``fp32``, ``bf16`` (low-precision candidates, exact re-scoring: same
            result) or ``auto`` (bf16 where the hardware is fast at it).

    Returns:
        ``(scores, indices)``, each (Q, k), best first; ties go to the lower index.
    """
    gpu = _on_cupy(keys, k, precision)
    if gpu is not None:
        return gpu[0].topk_cupy(queries, keys, k, chunk, precision=gpu[1])
    return on_tensors(
        queries, keys, k, call=lambda q, kk, _: _neighbours(q, kk, k, chunk, precision, "l2")[:2]
    )


def _aggregate(weights, idx, values):
    """``aggregate`` on the compiled CPU kernel where it applies (float32 CPU values)."""
    import torch

    if values.device.type != "cpu" or values.dtype != torch.float32 or not compiled_available():
        return aggregate(weights, idx, values)
    return aggregate_compiled(weights, idx, values)


def retrieve(
    queries,
    keys,
    values,
    k: int,
    *,
    distance: Distance = "l2",
    weighting: Weighting = "inverse_square",
    chunk: int | None = None,
    precision: Precision = "auto",
    query_block: int = 16384,
):
    """Predict each query's expression from its top-``k`` cosine neighbours in the bank.

    Weights are ``d^-2`` normalised over the neighbours, ``d`` the L1 or L2 distance
    between the *unnormalised* embeddings; ``weighting="mean"`` averages (BLEEP).
    Queries are scored ``query_block`` at a time (one pass over the bank each); their
    neighbour vectors are gathered in smaller blocks, bounding scratch memory.

    Returns:
        (Q, G) float32 predictions, as the caller's array type.
    """
    if distance not in ("l1", "l2"):
        msg = f"unknown distance {distance!r} (l1 or l2)"
        raise ValueError(msg)
    gpu = _on_cupy(keys, k, precision)
    if gpu is not None and values.ndim == 2 and len(values) == len(keys):
        return gpu[0].retrieve_cupy(
            queries, keys, values, k, distance=distance, weighting=weighting, chunk=chunk,
            precision=gpu[1], query_block=query_block,
        )  # fmt: skip
    return on_tensors(
        queries, keys, k, values,
        call=lambda q, kk, v: retrieve_blocks(
            q, kk, v, weighting=weighting, query_block=query_block, aggregate=_aggregate,
            neighbours=lambda qb: _neighbours(qb, kk, k, chunk, precision, distance),
        ),
    )  # fmt: skip


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
