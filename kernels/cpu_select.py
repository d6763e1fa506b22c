"""Compiled CPU steps of the retrieval kernel (numba).

- ``select_topm``: running top-m per query over score tiles. ``torch.topk`` over a
  Q x N block reads every score several times and sorts more than it needs; this reads
  each score once, skips ``BLOCK`` scores with one vectorised compare when none beats
  the row's threshold, and appends the rare survivors to a buffer cut back to the best
  m when it fills (amortised O(1) per survivor). Scores arrive as the raw bits of
  bfloat16 (int16) or float32 (int32), compared through an order-preserving integer
  key, so one code path serves both precisions.
- ``rescore_pairs``: exact cosine and L1/L2 distance of each candidate (float32, from
  the raw key row; no Q x m x D gather), the (query, candidate) pairs visited in bank
  order (``bucket_pairs``, a counting sort) so that a key row several queries share is
  read from memory once; ``aggregate_by_key`` sums neighbour expression the same way.
- ``unit_rows``: unit-normalise a key chunk (to float32, or to bfloat16 bits with the
  rounding error the exactness bound needs) in one pass.
- ``best_k``, ``bf16_window``: per-row sorting; the exactness bound of bf16 candidates
  and which of them need an exact score.

Kernels release the GIL; ``in_parallel`` splits rows over threads, ``background`` runs
one selection while the next score tile is being multiplied.
"""
# long module: the numba kernels and their thin dispatch live together so that one
# compiled-code cache (and one ``warm``) covers them; each kernel is short.

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
from numba import njit, uint64

BLOCK = 64  # scores tested together against a row's threshold (LLVM vectorises >= 64)
SUB = 16  # a block that beats the threshold is searched in sub-blocks of this size
# fastmath without its no-NaN/no-inf assumptions: only let sums be reordered (vectorised)
REORDER = {"reassoc", "contract", "nsz", "arcp"}
NO_THRESHOLD = np.int32(np.iinfo(np.int32).min)  # below every key: accept all
# key-ordered passes (rescore_pairs, aggregate_by_key) visit (query, key) pairs a bucket of
# 2^BUCKET_SHIFT bank rows at a time, so rows referenced by several queries are read from
# memory once and then hit cache (1,024 rows: 1 MiB of 256-d keys, 3 MiB of 785 genes)
BUCKET_SHIFT = 10


@njit(inline="always")
def _key(v, shift, mask):
    """Order-preserving integer key of a float's raw bits (widened to int32):
    negative floats have their magnitude bits flipped so integer order = float order."""
    x = np.int32(v)
    return x ^ ((x >> shift) & mask)


@njit(inline="always")
def _cut(bk, bi, count, m, scratch):
    """Keep the best ``m`` of ``count`` buffered (key, index) pairs, stably (ties keep
    the earlier, lower index); return the new threshold: the m-th best key."""
    scratch[:count] = bk[:count]
    tau = np.partition(scratch[:count], count - m)[count - m]
    greater = 0
    for t in range(count):
        if bk[t] > tau:
            greater += 1
    ties = m - greater
    w = 0
    for t in range(count):
        v = bk[t]
        if v > tau or (v == tau and ties > 0):
            if v == tau:
                ties -= 1
            bk[w] = v
            bi[w] = bi[t]
            w += 1
    return tau


def _run_uncached_if_cache_unwritable(*kernels) -> None:
    """numba writes its compiled code beside this file on first use; a full disk, a
    file-size limit or a read-only install must not fail the retrieval that triggered
    the compile (numba raises the OSError): the kernel then just runs uncached."""
    for kernel in kernels:
        cache = getattr(kernel, "_cache", None)
        save = getattr(cache, "save_overload", None)
        if save is None:
            continue

        def save_or_skip(sig, data, _save=save):
            with contextlib.suppress(OSError):
                _save(sig, data)

        cache.save_overload = save_or_skip


def state(rows: int, m: int):
    """Empty running top-``m`` state for ``rows`` queries: key and index buffers (room for
    2m survivors plus one block), fill counts and thresholds."""
    cap = 2 * m + BLOCK
    return (
        np.empty((rows, cap), np.int32),
        np.empty((rows, cap), np.int64),
        np.zeros(rows, np.int64),
        np.full(rows, NO_THRESHOLD, np.int32),
    )


@njit(nogil=True, cache=True)
def select_topm(scores, bk, bi, count, tau, start, shift, mask):
    """Fold a block of scores into each row's running top-m (state from ``state``).

    Args:
        scores: (R, C) int16 (bfloat16 bits) or int32 (float32 bits), C-contiguous rows;
            column j is key ``start + j``; row r updates row r of the state arrays.
        shift, mask: 15, 0x7FFF for bfloat16; 31, 0x7FFFFFFF for float32.
        bk, bi: (R, 2m + BLOCK) buffers of keys (int32) and key indices (int64).
        count: (R,) filled length of each buffer; tau: (R,) current thresholds.

    Keys are scanned in increasing index order, so a later key that merely ties the
    threshold never displaces an earlier one: ties resolve to the lower index.
    """
    rows, cols = scores.shape
    m = (bk.shape[1] - BLOCK) // 2
    scratch = np.empty(bk.shape[1], np.int32)
    for r in range(rows):
        row = scores[r]
        keys = bk[r]
        idx = bi[r]
        c = count[r]
        t = tau[r]
        for blk in range((cols + BLOCK - 1) // BLOCK):
            b = blk * BLOCK
            e = min(b + BLOCK, cols)
            hit = False
            if t >= 0 and e - b == BLOCK:
                # threshold >= +0: a raw bit pattern beats it exactly when its key does
                # (negative floats are negative integers); this fixed-length form vectorises
                base = uint64(b)
                for p in range(uint64(0), uint64(BLOCK)):
                    hit |= np.int32(row[base + p]) > t
            else:
                for p in range(uint64(b), uint64(e)):
                    hit |= _key(row[p], shift, mask) > t
            if not hit:
                continue
            for sb in range(b, e, SUB):  # the rare hit: find its sub-block(s)
                se = min(sb + SUB, e)
                hit = False
                if t >= 0:
                    for p in range(uint64(sb), uint64(se)):
                        hit |= np.int32(row[p]) > t
                else:
                    for p in range(uint64(sb), uint64(se)):
                        hit |= _key(row[p], shift, mask) > t
                if not hit:
                    continue
                for p in range(uint64(sb), uint64(se)):  # branch-free append
                    v = _key(row[p], shift, mask)
                    keys[uint64(c)] = v
                    idx[uint64(c)] = start + np.int64(p)
                    c += v > t
            if c >= 2 * m:
                t = _cut(keys, idx, c, m, scratch)
                c = m
        count[r] = c
        tau[r] = t


@njit(nogil=True, cache=True)
def finish_topm(bk, bi, count, m):
    """Cut every row's buffer to exactly its best ``m`` (rows hold at least ``m``)."""
    for r in range(bk.shape[0]):
        if count[r] > m:
            scratch = np.empty(count[r], np.int32)
            _cut(bk[r], bi[r], count[r], m, scratch)
            count[r] = m


@njit(nogil=True, cache=True)
def bucket_pairs(idx, keep, shift):
    """Flat positions of the (R, m) key indices ``idx`` (C-contiguous) where ``keep``,
    grouped by bank bucket ``idx >> shift`` in increasing bucket order, (row, column)
    order within one: a counting sort, three passes over ``idx``."""
    flat = idx.ravel()
    use = keep.ravel()
    nb = 1
    for p in range(flat.size):
        nb = max(nb, (flat[p] >> shift) + 1)
    start = np.zeros(nb + 1, np.int64)
    for p in range(flat.size):
        if use[p]:
            start[(flat[p] >> shift) + 1] += 1
    for b in range(nb):
        start[b + 1] += start[b]
    order = np.empty(start[nb], np.int64)
    for p in range(flat.size):
        if use[p]:
            b = flat[p] >> shift
            order[start[b]] = p
            start[b] += 1
    return order


@njit(nogil=True, cache=True, fastmath=REORDER)
def query_norms(queries, out):
    """``out[i] = max(|queries[i]|, 1e-12)`` in float32."""
    for i in range(queries.shape[0]):
        q = queries[i]
        out[i] = max(np.sqrt(np.sum(q * q)), np.float32(1e-12))


@njit(nogil=True, cache=True, fastmath=REORDER)
def rescore_pairs(pairs, queries, qnorm, cand, cos, dist, keys, order):
    """Exact cosine and L1 (``order`` 1) or L2 (2) distance of the candidates at flat
    positions ``pairs`` of ``cand`` (from ``bucket_pairs``), in key order so that a key
    row several queries share is read from memory once. Pairs are independent: any
    split of ``pairs`` can run in parallel.

    Float32 arithmetic with float32 inputs (relative error ~1e-6 at D = 256); fastmath
    only lets the sums be reordered so that they vectorise.

    Args:
        queries: (R, D) float32, unnormalised; qnorm: (R,) their norms
            (``query_norms``); cand: (R, m) int64 key indices; cos, dist: (R, m)
            float32 outputs; keys: (N, D) float32, unnormalised.
    """
    m = cand.shape[1]
    for t in range(pairs.shape[0]):
        p = pairs[t]
        i = p // m
        a = p - i * m
        q = queries[i]
        row = keys[cand[i, a]]
        if order == 2:
            dot, kk, acc = _dot_norm_l2(q, row)
            dist[i, a] = np.sqrt(acc)
        else:
            dot, kk, acc = _dot_norm_l1(q, row)
            dist[i, a] = acc
        cos[i, a] = dot / (qnorm[i] * max(np.sqrt(kk), np.float32(1e-12)))


# _dot_norm_l2 and _dot_norm_l1 are twins on purpose: the L2/L1 choice stays outside the
# inner loop, which must vectorise (one function with a branch inside was not measured).
@njit(inline="always", fastmath=REORDER)
def _dot_norm_l2(q, row):
    dot = np.float32(0.0)
    kk = np.float32(0.0)
    acc = np.float32(0.0)
    for d in range(q.shape[0]):
        x = row[d]
        y = q[d]
        dot += x * y
        kk += x * x
        diff = x - y
        acc += diff * diff
    return dot, kk, acc


@njit(inline="always", fastmath=REORDER)
def _dot_norm_l1(q, row):
    dot = np.float32(0.0)
    kk = np.float32(0.0)
    acc = np.float32(0.0)
    for d in range(q.shape[0]):
        x = row[d]
        y = q[d]
        dot += x * y
        kk += x * x
        acc += abs(x - y)
    return dot, kk, acc


@njit(inline="always")
def bf16_bits(u):
    """bfloat16 bits (uint16) of a finite float32, rounded to nearest even."""
    b = np.float32(u).view(np.uint32)
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> 16)


@njit(nogil=True, cache=True, fastmath=REORDER)
def unit_rows(src, out, err, bf16):
    """Rows of ``src`` (float32) scaled to unit length into ``out``: float32, or with
    ``bf16`` bfloat16 bits (uint16, round to nearest even as torch rounds) and ``err[i]``
    the length of row i's rounding error (float32: the squared length of the input).
    One pass over the chunk; a NaN/inf row leaves ``err`` non-finite for the caller."""
    for i in range(src.shape[0]):
        x = src[i]
        ss = np.float32(0.0)
        for d in range(x.shape[0]):
            ss += x[d] * x[d]
        inv = np.float32(1.0) / max(np.sqrt(ss), np.float32(1e-12))
        e = np.float32(0.0)
        for d in range(x.shape[0]):
            u = x[d] * inv
            if bf16:
                r = bf16_bits(u)
                out[i, d] = r
                back = np.uint32(np.uint32(r) << np.uint32(16)).view(np.float32)
                e += (back - u) * (back - u)
            else:
                out[i, d] = u
        err[i] = np.sqrt(e) if bf16 else ss  # NaN/inf in the row propagate to err


@njit(nogil=True, cache=True)
def best_k(cos, cand, dist, out_cos, out_idx, out_dist):
    """Each row's best k = ``out_cos.shape[1]`` of its m candidates, sorted by cosine
    descending, ties to the lower key index."""
    k = out_cos.shape[1]
    for i in range(cos.shape[0]):
        by_index = np.argsort(cand[i])
        c = cos[i][by_index]
        order = by_index[np.argsort(-c, kind="mergesort")[:k]]  # stable: index order kept
        for j in range(k):
            out_cos[i, j] = cos[i, order[j]]
            out_idx[i, j] = cand[i, order[j]]
            out_dist[i, j] = dist[i, order[j]]


@njit(inline="always")
def _round_bounds(v, u):
    """(lowest, highest) value a bfloat16 product output ``v`` can come from: the output
    rounding scales by at most 1 +- u."""
    if v >= 0:
        return v / (1 + u), v / (1 - u)
    return v / (1 - u), v / (1 + u)


@njit(nogil=True, cache=True)
def bf16_window(approx, eps, sure, keep, k, u):
    """The exactness bound of the bf16 candidates, per row (``retrieval._bf16_sure``):
    with ``kth`` the k-th best and ``low`` the worst of the row's m bf16 scores
    ``approx`` and ``eps`` (float64) its bound on |bf16 - exact| before output
    rounding, the row is ``sure`` when ``hi(low) + eps < lo(kth) - eps`` (no key outside
    the candidates can reach the k-th). In a sure row ``keep`` marks the candidates that
    can be in the float32 top-k, ``hi(score) + eps >= lo(kth) - eps``; the others (and
    a whole unsure row, redone in float32) need no exact score."""
    for i in range(approx.shape[0]):
        row = approx[i]
        kth = np.float64(np.partition(row, len(row) - k)[len(row) - k])
        low = np.float64(row.min())
        floor = _round_bounds(kth, u)[0] - eps[i]
        sure[i] = _round_bounds(low, u)[1] + eps[i] < floor
        for a in range(len(row)):
            keep[i, a] = sure[i] and _round_bounds(np.float64(row[a]), u)[1] + eps[i] >= floor


@njit(nogil=True, cache=True, fastmath=REORDER)
def aggregate_by_key(weights, idx, out, values, shift):
    """``out[i] = sum_j weights[i, j] * values[idx[i, j]]`` (float32 accumulation),
    visiting the (row, neighbour) pairs in bank order (buckets of
    ``2^shift`` rows), so that a value row several of these rows share is read from
    memory once while it is in cache; each output row still sums its neighbours in one
    fixed order (by bucket, then rank). Threads split the rows (``in_parallel``)."""
    out[:] = 0.0
    k = idx.shape[1]
    pairs = bucket_pairs(idx, np.ones(idx.shape, np.bool_), shift)
    for t in range(pairs.shape[0]):
        p = pairs[t]
        i = p // k
        j = p - i * k
        w = np.float32(weights[i, j])
        v = values[idx[i, j]]
        acc = out[i]
        for g in range(acc.shape[0]):
            acc[g] += w * v[g]


def in_parallel(kernel, rows, *scalars, workers: int | None = None) -> None:
    """Run ``kernel(*row_slices, *scalars)`` over contiguous row ranges in threads (the
    kernels release the GIL); ``rows`` are arrays sliced along their first axis."""
    n = len(rows[0])
    workers = max(1, min(workers or _threads(), n))
    if workers == 1:
        kernel(*rows, *scalars)
        return
    bounds = np.linspace(0, n, workers + 1).astype(int)
    futures = [
        _pool(workers, os.getpid()).submit(kernel, *(a[lo:hi] for a in rows), *scalars)
        for lo, hi in zip(bounds[:-1], bounds[1:])
        if hi > lo
    ]
    for f in futures:
        f.result()


def background(kernel, *args):
    """Start ``kernel(*args)`` on the selection thread; returns its future."""
    return _pool(1, os.getpid()).submit(kernel, *args)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


@lru_cache(maxsize=4)
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """A pool per worker count and process (a forked child must not reuse the parent's
    pool: its threads do not exist there)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="mclx-select")


def key_to_float(keys: np.ndarray, bf16: bool) -> np.ndarray:
    """Scores (float32) back from order-preserving int32 keys."""
    import torch

    shift, mask = (15, 0x7FFF) if bf16 else (31, 0x7FFFFFFF)
    bits = keys ^ ((keys >> shift) & mask)
    if bf16:
        t = torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16).float()
        return t.numpy()
    return bits.astype(np.int32).view(np.float32)


_run_uncached_if_cache_unwritable(
    select_topm,
    finish_topm,
    unit_rows,
    best_k,
    bf16_window,
    bucket_pairs,
    query_norms,
    rescore_pairs,
    aggregate_by_key,
)
