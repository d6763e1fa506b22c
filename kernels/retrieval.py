"""Exact chunked cosine top-k, inverse-square-distance weights, weighted aggregation.

One interface serves every array type, and the result comes back as the caller's
(the queries') array type. A bank of CuPy arrays runs the CuPy kernels of
:mod:`mclx.kernels.gpu_select` (cuBLAS scores, CUDA selection, re-scoring and
aggregation) once they have passed their self-check on that GPU; everything else, and
the CuPy case when the kernels step aside, runs the torch implementation below: numpy
arrays on the CPU (zero-copy ``torch.from_numpy``), CuPy arrays and torch tensors on
their device (zero-copy DLPack). The torch path is the fallback and the kernels' oracle.

Cost for Q queries, a bank of N keys of width D, k neighbours and G genes: scores take
2·Q·N·D flops and read N·D key values; selection reads Q·N scores once; re-scoring,
distances and aggregation touch O(Q·k·(D + G)) values. Keys are normalised a chunk at a
time and scores made one tile at a time, so scratch stays within a fixed budget, never
O(Q·N).

Selection. On CPU a compiled kernel (``cpu_select``, numba) folds each score tile into a
running top-m per query, skipping 64 scores at a time that cannot beat the row's current
threshold; a threshold estimated from a sample of the bank lets it skip almost
everything from the start (a row whose estimate proves too high is redone without one).
Candidates are then re-scored exactly from the raw float32 vectors, which also yields
their distances; re-scoring and aggregation visit the (query, key) pairs in bank order,
so a key or value row that several queries share is read from memory once. On the torch
path on a GPU (or without numba) ``torch.topk`` selects.

``precision="bf16"`` makes the scores in bfloat16 (AMX on CPU), keeps m > k candidates
and re-scores exactly those whose bf16 score can reach the k-th (on CPU; all of them on
the torch path). bfloat16 moves a query's cosine by at most ``eps_q``, bounded
from the measured rounding of that query, of the bank and of the output (``_bf16_sure``);
a query whose m-th candidate could still beat its k-th is redone in float32, so the
result is the float32 one. ``auto`` picks bf16 on CPUs with AMX when the bank is large
next to the candidates (N > 32m), float32 elsewhere.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from functools import lru_cache
from typing import Any, Literal

import numpy as np

Distance = Literal["l1", "l2"]
Weighting = Literal["inverse_square", "mean"]
Precision = Literal["auto", "fp32", "bf16"]

SCRATCH_BYTES = 256 * 2**20  # torch path: one Q x chunk score block
TILE_BYTES = 16 * 2**20  # compiled path: a score tile (two stay in L3 for the selection;
TILE_COLS = 8192  # oneDNN is ~as fast on 1024 x 8192 tiles as on 64 MiB ones, not below)
KEY_CHUNK = 65536  # compiled path: keys normalised per pass
GATHER_BLOCK = 512  # torch path: queries whose neighbour vectors are gathered at once
BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


_STAGES: dict[str, float] | None = None  # seconds per stage while stage_times() is open


@contextlib.contextmanager
def stage_times():
    """Collect seconds per stage of the compiled CPU path into the yielded dict
    (``bench/retrieval_stages.py``); stages of nested redo calls add to the same names.
    Outside this context the stage markers cost one global read."""
    global _STAGES
    prev, _STAGES = _STAGES, {}
    try:
        yield _STAGES
    finally:
        _STAGES = prev


@contextlib.contextmanager
def _stage(name: str):
    stages = _STAGES
    if stages is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0


def _count(name: str, n: int) -> None:
    """Add ``n`` to a counter of the open profile (see :func:`stage_times`)."""
    if _STAGES is not None:
        _STAGES[name] = _STAGES.get(name, 0) + n


def _torch():
    import torch

    return torch


def _as_tensor(x: Any):
    """numpy -> CPU tensor, CuPy -> CUDA tensor (both zero-copy), tensors unchanged."""
    torch = _torch()
    if isinstance(x, torch.Tensor):
        return x
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(x, cp.ndarray):
        return torch.from_dlpack(x)
    return torch.from_numpy(np.ascontiguousarray(x))


def _like(t, ref: Any):
    """Return tensor ``t`` as the array type of ``ref``: a CuPy ``ref`` gets a CuPy array
    (zero-copy from a CUDA tensor, copied from a CPU one: CuPy imports no host memory)."""
    torch = _torch()
    if isinstance(ref, torch.Tensor):
        return t
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(ref, cp.ndarray):
        if t.device.type == "cpu":  # CuPy queries against a host bank
            return cp.asarray(t.numpy())
        return cp.from_dlpack(t.contiguous())
    return t.cpu().numpy()


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 on this CPU (Linux /proc/cpuinfo)."""
    return bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return frozenset(fh.read().split())
    except OSError:
        return frozenset()


@lru_cache(maxsize=1)
def compiled_available() -> bool:
    """The numba CPU kernels import (numba comes with scanpy)."""
    try:
        import mclx.kernels.cpu_select  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_precision(precision: Precision, device, n: int = 0, k: int = 0) -> str:
    if precision == "auto":
        # measured (bench/test_retrieval.py, Q = 4096, k = 200): bf16 candidates + exact
        # re-scoring beat float32 on AMX once the bank is large next to the candidates
        # (N = 200k: 2-4x); at N = 13,620 the m = k + 256 re-scored candidates cost more
        # than the product saves. Elsewhere float32 (on GPU the products are cheap).
        fast = device.type == "cpu" and "amx_bf16" in _cpu_flags() and compiled_available()
        return "bf16" if fast and n > 32 * _bf16_candidates(k) else "fp32"
    if precision not in ("fp32", "bf16"):
        msg = f"unknown precision {precision!r} (auto, fp32 or bf16)"
        raise ValueError(msg)
    return precision


def _bf16_candidates(k: int) -> int:
    """Candidates kept from bf16 scores: enough that the exactness window (~0.01 cosine)
    rarely holds more than m - k keys (measured: k + 128 sent half the queries of a
    random 256-d 200k bank to the float32 redo, k + 256 none)."""
    return k + max(256, k // 2)


def _check(q, keys, k: int, values=None) -> None:
    torch = _torch()
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
    # keys are checked chunk by chunk as they are scored, values on the predictions:
    # a full-bank check would allocate a mask as large as the bank


def _unit(x):
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _unit_chunk(keys, start: int, stop: int):
    kc = _unit(keys[start:stop])
    if not bool(_torch().isfinite(kc.sum())):  # NaN/inf propagate; no bank-sized mask
        msg = f"keys contain NaN or infinite values (rows {start}-{stop - 1})"
        raise ValueError(msg)
    return kc


def _order(score, idx, k: int):
    """Permutation (Q, k) putting each row's best ``k`` first: score descending, then
    index ascending (deterministic ties)."""
    torch = _torch()
    o = torch.argsort(idx, dim=1)
    by_score = torch.argsort(torch.gather(score, 1, o), dim=1, descending=True, stable=True)
    return torch.gather(o, 1, by_score[:, :k])


def _bf16_sure(kth, mth, eps):
    """Rows whose float32 top-k surely lies among their bf16 candidates.

    ``kth`` and ``mth`` (Q,) are the k-th best and the worst of each row's m candidate
    bfloat16 scores (the best m of the bank). A bank key's exact cosine is within
    ``eps`` (per row) of its bf16 score before the output rounding, which scales it by
    at most 1 +- 2^-8. The k-th exact score is then at least ``lo(kth) - eps`` and any
    key outside the candidates at most ``hi(mth) + eps``; the row is sure when the
    second is below the first.
    """
    torch = _torch()
    u = BF16_U
    kth, mth = kth.double(), mth.double()
    hi = torch.where(mth >= 0, mth / (1 - u), mth / (1 + u))
    lo = torch.where(kth >= 0, kth / (1 + u), kth / (1 - u))
    return hi + eps < lo - eps


def _bf16_eps(qn, width: int, key_err: float):
    """Per-query bound on |bf16 score before output rounding - exact cosine|: the
    measured bf16 rounding error of the unit query (a) and the largest of the bank's unit
    keys (b) give |a| + |b| + |a||b|, plus float32 accumulation over ``width`` terms
    and the float32 normalisation (1e-6)."""
    a = (qn.to(_torch().bfloat16).float() - qn).norm(dim=1)
    return bf16_eps_from(a, width, key_err)


def bf16_eps_from(a, width: int, key_err: float):
    """:func:`_bf16_eps` from the queries' measured rounding errors ``a`` (Q,)."""
    a = a.double()
    acc = width * 2.0**-24 * (1 + a) * (1 + key_err)
    return a + key_err + a * key_err + acc + 1e-6


# --- compiled CPU path ----------------------------------------------------------


def _threshold_from_sample(qd, keys, m: int, bf16: bool):
    """Per-row starting thresholds (as selection keys) from a spread sample of the bank:
    the score expected to have ~3m bank keys above it, read off as the 32nd best of a
    sample of 32n/3m keys. A row ends with fewer than m (redone without a threshold)
    only when the sample holds 32 of the bank's best m, where ~10.7 are expected
    (Poisson: ~1e-7). Measured at N = 200k (512 queries, selection alone): the 48th
    best at ~2m, a sample 2.25x larger, saved less selection time than its product
    cost on AVX2 in float32 (0.36 s against 0.27 s for sample and selection), about as
    much as it cost in bf16 on AMX (estimated). None when the bank is small."""
    torch = _torch()
    n = len(keys)
    rank = 32
    s = math.ceil(rank * n / (3 * m))
    if n <= 32 * m or 2 * s > n:  # the bank is small next to m: nothing to gain
        return None
    pos = torch.linspace(0, n - 1, s).long()
    sample = _unit(keys[pos]).to(qd.dtype)
    from mclx.kernels import cpu_select as cs

    itype, shift, mask = _int_view(bf16)
    # the main scan's tiles: a row block of the whole sample at a large N was a skinny
    # product that read the sample again for every few rows (2M keys: a third of the time)
    cols = min(s, TILE_COLS)
    rows = max(1, TILE_BYTES // (qd.element_size() * cols))
    state = cs.state(len(qd), rank)
    tile = torch.empty(rows * cols, dtype=qd.dtype)
    for b in range(0, len(qd), rows):
        qb = qd[b : b + rows]
        part = [a[b : b + rows] for a in state]
        for c in range(0, s, cols):
            kt = sample[c : c + cols]
            scores = tile[: len(qb) * len(kt)].view(len(qb), len(kt))
            torch.mm(qb, kt.T, out=scores)
            cs.in_parallel(cs.select_topm, [scores.view(itype).numpy(), *part], c, shift, mask)
    cs.in_parallel(cs.finish_topm, list(state[:3]), rank)
    return state[0][:, :rank].min(axis=1)


def _int_view(bf16: bool):
    """Integer view dtype of the score bits and the key transform's shift and mask."""
    torch = _torch()
    return (torch.int16, 15, 0x7FFF) if bf16 else (torch.int32, 31, 0x7FFFFFFF)


def _unit_rows(keys, start: int, stop: int, unit: np.ndarray, err: np.ndarray, bf16: bool):
    """Keys ``start:stop`` as unit rows (bf16 or float32 torch view of ``unit``) and the
    worst bf16 rounding error among them (0 in float32)."""
    torch = _torch()
    from mclx.kernels import cpu_select as cs

    src = keys[start:stop].float().contiguous().numpy()
    cs.in_parallel(cs.unit_rows, [src, unit[: stop - start], err[: stop - start]], bf16)
    if not np.isfinite(err[: stop - start]).all():
        msg = f"keys contain NaN or infinite values (rows {start}-{stop - 1})"
        raise ValueError(msg)
    kd = torch.from_numpy(unit[: stop - start])
    if not bf16:
        return kd, 0.0
    return kd.view(torch.bfloat16), float(err[: stop - start].max())


def _select_compiled(qn, keys, m: int, chunk: int | None, bf16: bool, sample: bool = True):
    """Top-``m`` keys per query by bf16 or float32 score: (approx scores (Q, m) float32,
    indices (Q, m) int64, worst bf16 rounding error of a unit key)."""
    torch = _torch()
    from mclx.kernels import cpu_select as cs

    qd = qn.to(torch.bfloat16 if bf16 else torch.float32)
    state = cs.state(len(qn), m)
    with _stage("threshold sample"):
        tau0 = _threshold_from_sample(qd, keys, m, bf16) if sample else None
    if tau0 is not None:
        state[3][:] = tau0
    key_err = _scan_tiles(qd, keys, state, chunk, bf16)
    bk, bi, count, _ = state
    with _stage("finish"):
        cs.in_parallel(cs.finish_topm, [bk, bi, count], m)
    short = np.flatnonzero(count < m)  # the sampled threshold was too high for these
    if len(short):
        s_s, i_s, _ = _select_compiled(qn[short], keys, m, chunk, bf16, sample=False)
    approx = torch.from_numpy(cs.key_to_float(bk[:, :m], bf16))
    idx = torch.from_numpy(bi[:, :m].copy())
    if len(short):
        approx[short], idx[short] = s_s, i_s
    return approx, idx, key_err


def _timed_select(*args) -> None:
    """``select_topm`` on the selection thread, its time added to the open profile."""
    from mclx.kernels import cpu_select as cs

    with _stage("select (thread)"):
        cs.select_topm(*args)


def _wait(pending) -> None:
    """Wait for a background selection (None: nothing pending); returns None."""
    if pending is not None:
        pending.result()


def _scan_tiles(qd, keys, state, chunk: int | None, bf16: bool) -> float:
    """Fold the scores of ``qd`` against every (unit) key into ``state``, tile by tile;
    returns the worst bf16 rounding error of a unit key (0 in float32)."""
    torch = _torch()
    from mclx.kernels import cpu_select as cs

    n, width = keys.shape
    itype, shift, mask = _int_view(bf16)
    select = _timed_select if _STAGES is not None else cs.select_topm
    chunk = min(n, chunk or KEY_CHUNK)
    cols = min(chunk, TILE_COLS)
    rows = max(1, TILE_BYTES // (qd.element_size() * cols))
    # two tiles: the next product is computed while a worker thread selects from the last
    tiles = [torch.empty(rows * cols, dtype=qd.dtype) for _ in range(2)]
    pending = None
    key_err = 0.0
    step = 0
    unit = np.empty((chunk, width), np.uint16 if bf16 else np.float32)
    err = np.empty(chunk, np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        with _stage("select wait"):  # the selection thread may still read the last chunk
            pending = _wait(pending)
        with _stage("normalise"):
            kd, chunk_err = _unit_rows(keys, start, stop, unit, err, bf16)
        key_err = max(key_err, chunk_err)
        for b in range(0, len(qd), rows):
            qb = qd[b : b + rows]
            part = [a[b : b + rows] for a in state]
            for c in range(0, len(kd), cols):
                kt = kd[c : c + cols]
                tile = tiles[step % 2][: len(qb) * len(kt)].view(len(qb), len(kt))
                step += 1
                with _stage("product"):
                    torch.mm(qb, kt.T, out=tile)
                with _stage("select wait"):
                    pending = _wait(pending)
                pending = cs.background(
                    select, tile.view(itype).numpy(), *part, start + c, shift, mask
                )
    with _stage("select wait"):
        pending = _wait(pending)
    return key_err


def _window(approx, k: int, width: int, qn, key_err: float):
    """Rows whose float32 top-k surely lies among their bf16 candidates (``_bf16_sure``)
    and, for those, the candidates that can be in it: bf16 score within the rounding
    window of the k-th (``hi(score) + eps >= lo(kth) - eps``); the rest need no exact
    score. ``keep`` (Q, m) bool is False throughout an unsure row (it is redone).
    ``cpu_select.bf16_window`` computes both."""
    torch = _torch()
    from mclx.kernels import cpu_select as cs

    eps = _bf16_eps(qn, width, key_err).numpy()
    sure = np.empty(len(approx), np.bool_)
    keep = np.empty(approx.shape, np.bool_)
    cs.in_parallel(cs.bf16_window, [approx.numpy(), eps, sure, keep], k, BF16_U)
    return torch.from_numpy(sure), keep


def _rescore(q, keys, cand, keep, order: int):
    """Exact float32 cosine and distance of the candidates where ``keep`` (others: cosine
    -inf, distance inf), visited in key order (``cpu_select.rescore_pairs``)."""
    from mclx.kernels import cpu_select as cs

    cos = np.full(cand.shape, -np.inf, np.float32)
    dist = np.full(cand.shape, np.inf, np.float32)
    qf = q.float().contiguous().numpy()
    kf = keys.float().contiguous()  # no copy for a float32 bank
    qnorm = np.empty(len(qf), np.float32)
    cs.in_parallel(cs.query_norms, [qf, qnorm])
    pairs = cs.bucket_pairs(cand, keep, cs.BUCKET_SHIFT)
    cs.in_parallel(cs.rescore_pairs, [pairs], qf, qnorm, cand, cos, dist, kf.numpy(), order)
    return cos, dist


def _neighbours_compiled(q, keys, k: int, chunk, mode: str, order: int):
    """(cosine (Q, k) float64, indices (Q, k) int64, distances (Q, k) float64), sorted."""
    torch = _torch()
    from mclx.kernels import cpu_select as cs

    n, width = keys.shape
    qn = _unit(q)
    bf16 = mode == "bf16" and n > k
    m = min(n, _bf16_candidates(k)) if bf16 else k
    approx, cand, key_err = _select_compiled(qn, keys, m, chunk, bf16)
    cand = cand.numpy()
    sure, keep = None, np.ones(cand.shape, np.bool_)
    if bf16 and m < n:
        with _stage("bound check"):
            sure, keep = _window(approx, k, width, qn, key_err)
        _count("candidates rescored", int(keep.sum()))
    with _stage("rescore"):
        cos, dist = _rescore(q, keys, cand, keep, order)
    out = (np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64))
    out = (*out, np.empty((len(q), k), np.float32))
    with _stage("best_k"):
        cs.in_parallel(cs.best_k, [cos, cand, dist, *out])
    out = tuple(torch.from_numpy(a) for a in out)
    if sure is not None:
        unsure = torch.nonzero(~sure).flatten()
        _count("rows redone in float32", len(unsure))
        if len(unsure):
            redo = _neighbours_compiled(q[unsure], keys, k, chunk, "fp32", order)
            for t, r in zip(out, redo):
                t[unsure] = r
    return out


# --- torch path (GPU, or CPU without numba) ---------------------------------------


def _merge(best_s, best_i, s, start: int, m: int):
    """Keep the ``m`` best of the running candidates and a new score block."""
    torch = _torch()
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
    torch = _torch()
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
    torch = _torch()
    out = torch.empty(cand.shape, dtype=torch.float32, device=cand.device)
    for b in range(0, len(cand), block):
        c = cand[b : b + block]
        nb = _unit(keys[c.reshape(-1)]).view(*c.shape, -1)
        out[b : b + block] = torch.bmm(nb, qn[b : b + block].unsqueeze(2)).squeeze(2)
    return out


def _topk_torch(q, keys, k: int, chunk: int | None, mode: str):
    """(scores (Q, k) float32, indices (Q, k)) sorted, via ``torch.topk``."""
    torch = _torch()
    n, width = keys.shape
    qn = _unit(q)
    if mode == "fp32" or n <= k:
        s, i, _ = _scan(qn, keys, k, chunk, torch.float32)
        o = _order(s, i, k)
        return torch.gather(s, 1, o), torch.gather(i, 1, o)
    m = min(n, _bf16_candidates(k))
    approx, cand, key_err = _scan(qn, keys, m, chunk, torch.bfloat16)
    exact = _rerank(qn, keys, cand)
    o = _order(exact, cand, k)
    s, i = torch.gather(exact, 1, o), torch.gather(cand, 1, o)
    if m < n:
        top = torch.topk(approx.cpu(), k, dim=1).values[:, -1]
        eps = _bf16_eps(qn.cpu(), width, key_err)
        unsure = torch.nonzero(~_bf16_sure(top, approx.cpu().min(dim=1).values, eps))
        unsure = unsure.flatten().to(q.device)
        if len(unsure):
            s[unsure], i[unsure] = _topk_torch(q[unsure], keys, k, chunk, "fp32")
    return s, i


def _distances(q, keys, idx, distance: Distance):
    """L1 or L2 distances (Q, k) between queries and their neighbours, in float32 (relative
    error ~1e-7), gathered ``GATHER_BLOCK`` queries at a time and reduced in place."""
    torch = _torch()
    order = 2 if distance == "l2" else 1
    out = torch.empty(idx.shape, dtype=torch.float64, device=idx.device)
    for b in range(0, len(idx), GATHER_BLOCK):
        i = idx[b : b + GATHER_BLOCK]
        nb = keys[i.reshape(-1)].view(*i.shape, -1).float()
        nb.sub_(q[b : b + GATHER_BLOCK, None, :])
        out[b : b + GATHER_BLOCK] = torch.linalg.vector_norm(nb, ord=order, dim=2)
    return out


# --- public API -------------------------------------------------------------------


def _neighbours(q, keys, k: int, chunk, precision: Precision, distance: Distance):
    """Sorted top-``k`` (scores, indices, distances) of every query, on the keys' device."""
    mode = _resolve_precision(precision, keys.device, len(keys), k)
    if chunk is not None:
        chunk = max(int(chunk), 1)
    order = 2 if distance == "l2" else 1
    if keys.device.type == "cpu" and compiled_available():
        cos, idx, dist = _neighbours_compiled(q, keys, k, chunk, mode, order)
        return cos.float(), idx, dist
    s, idx = _topk_torch(q, keys, k, chunk, mode)
    return s, idx, _distances(q.float(), keys, idx, distance)


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
    torch = _torch()
    kk = _as_tensor(keys)
    q = _as_tensor(queries).to(kk.device)
    _check(q, kk, k)
    with torch.inference_mode():
        s, i, _ = _neighbours(q, kk, k, chunk, precision, "l2")
    return _like(s, queries), _like(i, queries)


def neighbour_weights(dist, weighting: Weighting = "inverse_square"):
    """Weights over the k neighbours (Q, k) from their distances, each row summing to 1.

    ``inverse_square``: ``d^-2 / sum d^-2``, computed as ``(d_min / d)^2`` normalised so
    nothing overflows; a row with exact matches (d = 0) shares all weight among them.
    ``mean``: uniform.
    """
    torch = _torch()
    d = _as_tensor(dist).double()
    if weighting == "mean":
        w = torch.full_like(d, 1.0 / d.shape[1])
    elif weighting == "inverse_square":
        dmin = d.min(dim=1, keepdim=True).values
        exact = (d == 0).double()
        w = torch.where(dmin == 0, exact, (dmin / d.clamp_min(1e-300)) ** 2)
    else:
        msg = f"unknown weighting {weighting!r} (inverse_square or mean)"
        raise ValueError(msg)
    return _like(w / w.sum(dim=1, keepdim=True), dist)


def aggregate(weights, indices, values):
    """``sum_j w_qj · values[indices_qj]`` as a sparse (Q x N) @ (N x G) product, float32."""
    torch = _torch()
    w, idx, v = _as_tensor(weights), _as_tensor(indices), _as_tensor(values)
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
        return _like(sparse @ v.float(), values)


def _aggregate(weights, idx, values):
    """``aggregate`` on the compiled CPU kernel where it applies (float32 CPU values)."""
    torch = _torch()
    if values.device.type != "cpu" or values.dtype != torch.float32 or not compiled_available():
        return aggregate(weights, idx, values)
    from mclx.kernels import cpu_select as cs

    out = np.empty((len(idx), values.shape[1]), np.float32)
    w = weights.float().contiguous().numpy()
    rows = [w, idx.contiguous().numpy(), out]
    # bank order pays where value rows are shared (Q = 4096, k = 200, N = 200k: 1.3-1.8x
    # faster); at fewer pairs than rows (N = 2M) row order was 1.1x faster, and one
    # bucket (shift 63) keeps it
    shift = cs.BUCKET_SHIFT if idx.numel() >= len(values) else 63
    cs.in_parallel(cs.aggregate_by_key, rows, values.contiguous().numpy(), shift)
    return torch.from_numpy(out)


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
    torch = _torch()
    kk, v = _as_tensor(keys), _as_tensor(values)
    q = _as_tensor(queries).to(kk.device)  # host queries against a device-resident bank
    _check(q, kk, k, v)
    out = []
    with torch.inference_mode():
        for start in range(0, len(q), query_block):
            qb = q[start : start + query_block]
            _, idx, dist = _neighbours(qb, kk, k, chunk, precision, distance)
            with _stage("weights"):
                w = neighbour_weights(dist, weighting)
            with _stage("aggregate"):
                out.append(_aggregate(w, idx, v))
        pred = torch.cat(out) if out else torch.zeros((0, v.shape[1]), device=v.device)
        if not bool(torch.isfinite(pred).all()):
            msg = "values contain NaN or infinite values in rows chosen as neighbours"
            raise ValueError(msg)
    return _like(pred, queries)


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
