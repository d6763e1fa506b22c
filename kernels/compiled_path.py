"""The compiled CPU retrieval path: torch products (oneDNN; bfloat16 on AMX) and the numba
kernels of :mod:`mclx.kernels.cpu_select`, orchestrated here.

A compiled kernel folds each score tile into a running top-m per query, skipping 64
scores at a time that cannot beat the row's current threshold; a threshold estimated
from a sample of the bank lets it skip almost everything from the start (a row whose
estimate proves too high is redone without one). The next tile's product is computed
while a worker thread selects from the last. Candidates are then re-scored exactly from
the raw float32 vectors, which also yields their distances; re-scoring and aggregation
visit the (query, key) pairs in bank order, so a key or value row that several queries
share is read from memory once. In bf16 only the candidates whose score can reach the
k-th are re-scored (:mod:`mclx.kernels.bf16`). Stages are timed under
:func:`mclx.kernels.stages.stage_times`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from mclx.kernels.bf16 import BF16_U, bf16_candidates, bf16_eps
from mclx.kernels.stages import active, count, stage
from mclx.kernels.torch_path import unit

TILE_BYTES = 16 * 2**20  # a score tile (two stay in L3 for the selection;
TILE_COLS = 8192  # oneDNN is ~as fast on 1024 x 8192 tiles as on 64 MiB ones, not below)
KEY_CHUNK = 65536  # keys normalised per pass


@lru_cache(maxsize=1)
def compiled_available() -> bool:
    """The numba CPU kernels import (numba comes with scanpy)."""
    try:
        import mclx.kernels.cpu_select  # noqa: F401
    except ImportError:
        return False
    return True


def _threshold_from_sample(qd, keys, m: int, bf16: bool):
    """Per-row starting thresholds (as selection keys) from a spread sample of the bank:
    the score expected to have ~3m bank keys above it, read off as the 32nd best of a
    sample of 32n/3m keys. A row ends with fewer than m (redone without a threshold)
    only when the sample holds 32 of the bank's best m, where ~10.7 are expected
    (Poisson: ~1e-7). Measured at N = 200k (512 queries, selection alone): the 48th
    best at ~2m, a sample 2.25x larger, saved less selection time than its product
    cost on AVX2 in float32 (0.36 s against 0.27 s for sample and selection), about as
    much as it cost in bf16 on AMX (estimated). None when the bank is small."""
    import torch

    n = len(keys)
    rank = 32
    s = math.ceil(rank * n / (3 * m))
    if n <= 32 * m or 2 * s > n:  # the bank is small next to m: nothing to gain
        return None
    pos = torch.linspace(0, n - 1, s).long()
    sample = unit(keys[pos]).to(qd.dtype)
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
    import torch

    return (torch.int16, 15, 0x7FFF) if bf16 else (torch.int32, 31, 0x7FFFFFFF)


def _unit_rows(keys, start: int, stop: int, unit: np.ndarray, err: np.ndarray, bf16: bool):
    """Keys ``start:stop`` as unit rows (bf16 or float32 torch view of ``unit``) and the
    worst bf16 rounding error among them (0 in float32)."""
    import torch

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
    import torch

    from mclx.kernels import cpu_select as cs

    qd = qn.to(torch.bfloat16 if bf16 else torch.float32)
    state = cs.state(len(qn), m)
    with stage("threshold sample"):
        tau0 = _threshold_from_sample(qd, keys, m, bf16) if sample else None
    if tau0 is not None:
        state[3][:] = tau0
    key_err = _scan_tiles(qd, keys, state, chunk, bf16)
    bk, bi, count, _ = state
    with stage("finish"):
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

    with stage("select (thread)"):
        cs.select_topm(*args)


def _wait(pending) -> None:
    """Wait for a background selection (None: nothing pending); returns None."""
    if pending is not None:
        pending.result()


def _scan_tiles(qd, keys, state, chunk: int | None, bf16: bool) -> float:
    """Fold the scores of ``qd`` against every (unit) key into ``state``, tile by tile;
    returns the worst bf16 rounding error of a unit key (0 in float32)."""
    import torch

    from mclx.kernels import cpu_select as cs

    n, width = keys.shape
    itype, shift, mask = _int_view(bf16)
    select = _timed_select if active() else cs.select_topm
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
        with stage("select wait"):  # the selection thread may still read the last chunk
            pending = _wait(pending)
        with stage("normalise"):
            kd, chunk_err = _unit_rows(keys, start, stop, unit, err, bf16)
        key_err = max(key_err, chunk_err)
        for b in range(0, len(qd), rows):
            qb = qd[b : b + rows]
            part = [a[b : b + rows] for a in state]
            for c in range(0, len(kd), cols):
                kt = kd[c : c + cols]
                tile = tiles[step % 2][: len(qb) * len(kt)].view(len(qb), len(kt))
                step += 1
                with stage("product"):
                    torch.mm(qb, kt.T, out=tile)
                with stage("select wait"):
                    pending = _wait(pending)
                pending = cs.background(
                    select, tile.view(itype).numpy(), *part, start + c, shift, mask
                )
    with stage("select wait"):
        pending = _wait(pending)
    return key_err


def _window(approx, k: int, width: int, qn, key_err: float):
    """Rows whose float32 top-k surely lies among their bf16 candidates (``bf16_sure``)
    and, for those, the candidates that can be in it: bf16 score within the rounding
    window of the k-th (``hi(score) + eps >= lo(kth) - eps``); the rest need no exact
    score. ``keep`` (Q, m) bool is False throughout an unsure row (it is redone).
    ``cpu_select.bf16_window`` computes both."""
    import torch

    from mclx.kernels import cpu_select as cs

    eps = bf16_eps(qn, width, key_err).numpy()
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


def neighbours_compiled(q, keys, k: int, chunk, mode: str, order: int):
    """(cosine (Q, k) float64, indices (Q, k) int64, distances (Q, k) float64), sorted."""
    import torch

    from mclx.kernels import cpu_select as cs

    n, width = keys.shape
    qn = unit(q)
    bf16 = mode == "bf16" and n > k
    m = min(n, bf16_candidates(k)) if bf16 else k
    approx, cand, key_err = _select_compiled(qn, keys, m, chunk, bf16)
    cand = cand.numpy()
    sure, keep = None, np.ones(cand.shape, np.bool_)
    if bf16 and m < n:
        with stage("bound check"):
            sure, keep = _window(approx, k, width, qn, key_err)
        count("candidates rescored", int(keep.sum()))
    with stage("rescore"):
        cos, dist = _rescore(q, keys, cand, keep, order)
    out = (np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64))
    out = (*out, np.empty((len(q), k), np.float32))
    with stage("best_k"):
        cs.in_parallel(cs.best_k, [cos, cand, dist, *out])
    out = tuple(torch.from_numpy(a) for a in out)
    if sure is not None:
        unsure = torch.nonzero(~sure).flatten()
        count("rows redone in float32", len(unsure))
        if len(unsure):
            redo = neighbours_compiled(q[unsure], keys, k, chunk, "fp32", order)
            for t, r in zip(out, redo):
                t[unsure] = r
    return out


def aggregate_compiled(weights, idx, values):
    """:func:`mclx.kernels.aggregate` on the compiled kernel (float32 CPU values)."""
    import torch

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
