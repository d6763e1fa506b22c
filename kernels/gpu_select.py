"""GPU retrieval on CuPy arrays: the GPU counterpart of ``cpu_select`` (issue 11).

For a bank resident on the GPU (CuPy arrays) and Q queries:

- keys are unit-normalised a chunk at a time (``unit_rows_f32``, or ``unit_rows_bf16``
  with each row's rounding error for the exactness bound);
- scores come from cuBLAS (``gemmEx`` through CuPy: float32 in and out with FP32 compute,
  no TF32; or bfloat16 in, float32 out with FP32 accumulation), one Q-block x key-tile
  at a time: scratch is one tile, never Q x N;
- ``select_topm`` folds each tile into a running top-m per query (one read per score,
  a score below the row's threshold is skipped, a buffer in shared memory cut back to
  the best m when full), ``finish_topm`` sorts it;
- ``rescore`` computes the exact float32 cosine and L1/L2 distance of each candidate
  from the raw vectors, ``best_k`` keeps the best k (ties to the lower index);
- in bf16 the m = k + max(256, k/2) candidates are proven to hold the float32 top-k by
  the same bound as on the CPU (:func:`mclx.kernels.bf16.bf16_sure`); a query
  that is not sure is redone in float32;
- ``weights_rows`` and ``aggregate_rows`` give the inverse-square-distance weighted
  expression.

The CUDA sources are ``kernels/cuda/*.cu`` (compiled by CuPy for the device; compiled
by NVRTC without a GPU in ``make test``). At first use on a device, :func:`usable` runs
the kernels on a small random block and compares them with the torch path; on any
mismatch or error it warns once and the torch path serves the process. m above
:data:`MAX_M` (k > 896 in float32) also runs the torch path.
"""
# long module: the host side of each CUDA kernel beside its launch, one file per device path

from __future__ import annotations

import math
import os
import sys
import threading
import warnings
from typing import Any

import numpy as np

from mclx.kernels.gpu_memory import CAP as _CAP

BLOCK = 256  # threads per block (retrieval.cu's BLOCK)
CAP = _CAP  # running top-m buffer per query (retrieval.cu's CAP)
MAX_M = (CAP - BLOCK) // 2  # candidates a query keeps at most (also <= SORT_MAX)
TILE_BYTES = 256 * 2**20  # one float32 score tile
TILE_COLS = 32768
KEY_CHUNK = 65536  # keys unit-normalised per pass
_i32 = np.int32


class Kernels:
    """The compiled CUDA kernels (one CuPy RawModule, compiled per device on first use)
    and the cuBLAS product; ``launch(name, grid, block, *args)``."""

    def __init__(self) -> None:
        import cupy as cp

        from mclx.kernels.nvrtc import OPTIONS, source

        self.cp = cp
        self.module = cp.RawModule(code=source("retrieval.cu"), options=OPTIONS)

    def launch(self, name: str, grid: tuple, block: tuple, *args) -> None:
        self.module.get_function(name)(grid, block, args)

    def gemm(self, q, keys, out, bf16: bool) -> None:
        """``out (R x C) = q (R x D) @ keys (C x D).T`` in float32 (bf16: inputs are
        bfloat16 bits in uint16 arrays), all C-contiguous."""
        from cupy_backends.cuda.api import runtime
        from cupy_backends.cuda.libs import cublas

        cp = self.cp
        handle = cp.cuda.device.get_cublas_handle()
        cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
        mode = cublas.getPointerMode(handle)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
        dtype = runtime.CUDA_R_16BF if bf16 else runtime.CUDA_R_32F
        compute = cublas.CUBLAS_COMPUTE_32F if bf16 else cublas.CUBLAS_COMPUTE_32F_PEDANTIC
        (rows, width), cols = q.shape, keys.shape[0]
        try:  # column-major: out.T (C x R) = keys (C x D) @ q.T (D x R)
            cublas.gemmEx(
                handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, cols, rows, width,
                one.ctypes.data, keys.data.ptr, dtype, width, q.data.ptr, dtype, width,
                zero.ctypes.data, out.data.ptr, runtime.CUDA_R_32F, cols, compute,
                cublas.CUBLAS_GEMM_DEFAULT,
            )  # fmt: skip
        finally:
            cublas.setPointerMode(handle, mode)


_kernels: Kernels | None = None
_checked: dict[int, bool] = {}
_lock = threading.RLock()


def kernels() -> Kernels:
    """The process's :class:`Kernels` (tests put a stand-in in ``_kernels``)."""
    global _kernels
    with _lock:
        if _kernels is None:
            _kernels = Kernels()
        return _kernels


def supports(k: int, n: int, precision: str) -> bool:
    """Whether the kernels take this query: the candidates fit the shared buffers."""
    from mclx.kernels.bf16 import bf16_candidates

    m = min(n, bf16_candidates(k)) if precision == "bf16" and n > k else k
    return m <= MAX_M


def _unit(ops, x, bf16: bool, what: str, offset: int = 0):
    """Unit rows of ``x`` (float32, or bf16 bits) and their rounding errors (host,
    float32); NaN / inf rows are refused."""
    cp = ops.cp
    rows, width = x.shape
    out = cp.empty((rows, width), cp.uint16 if bf16 else cp.float32)
    err = cp.empty(rows, cp.float32)
    grid = (max(1, math.ceil(rows * 32 / BLOCK)),)  # a warp per row
    name = "unit_rows_bf16" if bf16 else "unit_rows_f32"
    ops.launch(name, grid, (BLOCK,), x, out, err, _i32(rows), _i32(width))
    host = err.get()
    if not np.isfinite(host).all():
        bad = offset + int(np.flatnonzero(~np.isfinite(host))[0])
        msg = f"{what} contain NaN or infinite values (row {bad})"
        raise ValueError(msg)
    return out, host


def _select(ops, qd, keys, m: int, chunk: int | None, bf16: bool):
    """Top-``m`` keys per query by bf16 or float32 score: (approx scores (Q, m) float32
    sorted best first, key indices (Q, m) int32, worst bf16 rounding error of a key)."""
    cp = ops.cp
    n, rows_q = len(keys), len(qd)
    chunk = min(n, chunk or KEY_CHUNK)
    cols = min(chunk, TILE_COLS)
    qrows = max(1, min(rows_q, TILE_BYTES // (4 * cols)))
    buf_s = cp.empty((rows_q, CAP), cp.float32)
    buf_i = cp.empty((rows_q, CAP), cp.int32)
    count = cp.zeros(rows_q, cp.int32)
    tau = cp.full(rows_q, -np.inf, cp.float32)
    tile = cp.empty(qrows * cols, cp.float32)
    key_err = 0.0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        kd, err = _unit(ops, keys[start:stop], bf16, "keys", start)
        key_err = max(key_err, float(err.max())) if bf16 else 0.0
        for c in range(0, stop - start, cols):
            kt = kd[c : c + cols]
            for b in range(0, rows_q, qrows):
                qb = qd[b : b + qrows]
                t = tile[: len(qb) * len(kt)].reshape(len(qb), len(kt))
                ops.gemm(qb, kt, t, bf16)
                args = (t, _i32(len(qb)), _i32(len(kt)), _i32(len(kt)), _i32(start + c))
                state = (buf_s[b : b + qrows], buf_i[b : b + qrows], count[b : b + qrows])
                state += (tau[b : b + qrows], _i32(m))
                ops.launch("select_topm", (len(qb),), (BLOCK,), *args, *state)
    out_s = cp.empty((rows_q, m), cp.float32)
    out_i = cp.empty((rows_q, m), cp.int32)
    ops.launch("finish_topm", (rows_q,), (BLOCK,), buf_s, buf_i, count, out_s, out_i,
               _i32(rows_q), _i32(m))  # fmt: skip
    return out_s, out_i, key_err


def _best(ops, q, keys, cand, k: int, order: int):
    """Exact re-scoring of the candidates: sorted (cosine, index, distance), each (Q, k)."""
    cp = ops.cp
    rows, m = cand.shape
    cos = cp.empty((rows, m), cp.float32)
    dist = cp.empty((rows, m), cp.float32)
    grid = (max(1, math.ceil(rows * m * 32 / BLOCK)),)
    ops.launch("rescore", grid, (BLOCK,), q, keys, cand, cos, dist, _i32(rows), _i32(m),
               _i32(keys.shape[1]), _i32(order))  # fmt: skip
    out = (cp.empty((rows, k), cp.float32), cp.empty((rows, k), cp.int32))
    out = (*out, cp.empty((rows, k), cp.float32))
    ops.launch("best_k", (rows,), (BLOCK,), cos, cand, dist, *out, _i32(rows), _i32(m), _i32(k))
    return out


def neighbours(q, keys, k: int, *, chunk=None, mode: str = "fp32", order: int = 2):
    """Sorted top-``k`` (cosine (Q, k) float32, indices (Q, k) int32, distances (Q, k)
    float32) of float32 C-contiguous CuPy ``q`` against ``keys`` on the same GPU."""
    import torch

    from mclx.kernels.bf16 import bf16_candidates, bf16_eps_from, bf16_sure

    ops = kernels()
    n, width = keys.shape
    if not len(q):  # no launch has a zero-sized grid
        cp = ops.cp
        return (
            cp.empty((0, k), cp.float32),
            cp.empty((0, k), cp.int32),
            cp.empty((0, k), cp.float32),
        )
    bf16 = mode == "bf16" and n > k
    m = min(n, bf16_candidates(k)) if bf16 else k
    qd, q_err = _unit(ops, q, bf16, "queries")
    approx, cand, key_err = _select(ops, qd, keys, m, chunk, bf16)
    out = _best(ops, q, keys, cand, k, order)
    if bf16 and m < n:
        top = torch.from_numpy(approx.get())
        eps = bf16_eps_from(torch.from_numpy(q_err), width, key_err)
        unsure = np.flatnonzero(~bf16_sure(top[:, k - 1], top[:, m - 1], eps).numpy())
        if len(unsure):
            rows = ops.cp.asarray(unsure)
            redo = neighbours(q[rows], keys, k, chunk=chunk, mode="fp32", order=order)
            for t, r in zip(out, redo):
                t[rows] = r
    return out


def aggregate(dist, idx, values, weighting: str):
    """Weights from the distances and the weighted expression (Q, G) float32."""
    ops = kernels()
    cp = ops.cp
    rows, k = idx.shape
    genes = values.shape[1]
    w = cp.empty((rows, k), cp.float32)
    mean = _i32(weighting == "mean")
    grid = (max(1, math.ceil(rows / BLOCK)),)
    ops.launch("weights_rows", grid, (BLOCK,), dist, w, _i32(rows), _i32(k), mean)
    out = cp.empty((rows, genes), cp.float32)
    grid = (max(1, rows), max(1, math.ceil(genes / BLOCK)))
    ops.launch("aggregate_rows", grid, (BLOCK,), w, idx, values, out, _i32(rows), _i32(k),
               _i32(genes))  # fmt: skip
    return out


def usable(device: int) -> bool:
    """Whether the kernels may serve ``device`` in this process: they agreed with the
    torch path on a small random block the first time this was asked (else a warning,
    once, and False). ``MCLX_CUPY_KERNELS=0`` turns them off."""
    if os.environ.get("MCLX_CUPY_KERNELS", "1") == "0":
        return False
    with _lock:
        if device not in _checked:
            _checked[device] = _self_check(device)
        return _checked[device]


def _self_check(device: int) -> bool:
    """The kernels against the torch path (on this GPU where PyTorch sees it, else on
    the CPU) on a small random block: both precisions, both distances, several key
    chunks, buffer cuts and a tied pair of keys."""
    cp = sys.modules["cupy"]
    rng = np.random.default_rng(0)
    q = rng.normal(size=(37, 40)).astype(np.float32)
    keys = rng.normal(size=(5003, 40)).astype(np.float32)
    keys[1] = keys[0]  # a tie: the lower index first
    vals = rng.gamma(1.0, size=(5003, 6)).astype(np.float32)
    try:
        with cp.cuda.Device(device):
            mine = [cp.asarray(a) for a in (q, keys, vals)]
            ref = _reference_arrays(device, (q, keys, vals))
            for mode in ("fp32", "bf16"):
                for distance in ("l1", "l2"):
                    why = _compare(mine, ref, mode, distance)
                    if why:
                        return _disable(device, why)
    except Exception as exc:  # compile error, launch failure, cuBLAS error
        return _disable(device, f"{type(exc).__name__}: {exc}")
    return True


def _reference_arrays(device: int, arrays):
    """The self-check's inputs for the torch path: CUDA tensors on ``device`` where
    PyTorch sees GPUs, else the host arrays (the CPU path, float32 exact as well)."""
    import torch

    if not torch.cuda.is_available():
        return arrays
    return [torch.from_numpy(a).to(f"cuda:{device}") for a in arrays]


def _compare(mine, ref, mode: str, distance: str) -> str:
    """Why the kernels and the reference differ ('' when they agree)."""
    from mclx.kernels.torch_path import like as host_like
    from mclx.kernels.torch_path import retrieve, topk

    kw = {"chunk": 1500, "precision": mode}
    _, gi = topk_cupy(mine[0], mine[1], 25, **kw)
    _, wi = topk(ref[0], ref[1], 25, **kw)
    wi = host_like(wi, np.zeros(1)) if not isinstance(wi, np.ndarray) else wi
    if not np.array_equal(np.sort(gi.get(), 1), np.sort(wi, 1)):
        return f"{mode}: other neighbours than the torch path"
    got = retrieve_cupy(*mine, 25, distance=distance, **kw).get()
    want = retrieve(*ref, 25, distance=distance, **kw)
    want = host_like(want, np.zeros(1)) if not isinstance(want, np.ndarray) else want
    if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
        worst = float(np.max(np.abs(got - want) / (np.abs(want) + 1e-6)))
        return f"{mode} {distance}: predictions differ (relative {worst:.1e})"
    return ""


def _disable(device: int, why: str) -> bool:
    why = " ".join(why.split())[:300]
    msg = (
        f"mclx.kernels: the CuPy retrieval kernels failed their self-check on GPU {device} "
        f"({why}); using the torch path in this process"
    )
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return False


def _prepare(queries, keys, k: int, values=None):
    """CuPy float32 C-contiguous queries (copied from host memory or a CPU tensor; a
    CuPy or CUDA-tensor query must be on the keys' GPU), keys and values, checked as the
    torch path checks them."""
    cp = sys.modules["cupy"]
    from mclx.kernels.torch_path import check_inputs

    keys = cp.asarray(keys, dtype=cp.float32, order="C")
    if type(queries).__module__.startswith("torch"):
        t = queries.detach().float().contiguous()
        q = cp.from_dlpack(t) if t.is_cuda else cp.asarray(t.numpy())
    else:  # CuPy (no copy when float32 and C-contiguous) or host memory
        q = cp.asarray(queries, dtype=cp.float32, order="C")
    vals = None if values is None else cp.asarray(values, dtype=cp.float32, order="C")
    check_inputs(_Shape(q), _Shape(keys), k, None if vals is None else _Shape(vals))
    if len(q) and not bool(cp.isfinite(q).all()):
        msg = "queries contain NaN or infinite values"
        raise ValueError(msg)
    return q, keys, vals


class _Shape:
    """What ``torch_path.check_inputs`` reads of an array (no data: the finiteness of the
    queries is checked on the GPU)."""

    def __init__(self, a: Any) -> None:
        self.shape, self.ndim = tuple(a.shape), a.ndim

    def numel(self) -> int:
        return 0


def _like(x, ref):
    """CuPy result ``x`` as the array type of the caller's ``ref``."""
    cp = sys.modules["cupy"]
    if isinstance(ref, cp.ndarray):
        return x
    if type(ref).__module__.startswith("torch"):
        import torch

        return torch.from_dlpack(x) if ref.is_cuda else torch.from_numpy(x.get())
    return x.get()


def _block(cp, q, keys, k: int, precision: str, limit: int | None = None) -> int:
    """Queries per call of :func:`neighbours`: their scratch fits the free memory
    (:func:`mclx.kernels.gpu_memory.queries_per_block`)."""
    from mclx.kernels.bf16 import bf16_candidates
    from mclx.kernels.gpu_memory import queries_per_block

    n, width = keys.shape
    m = min(n, bf16_candidates(k)) if precision == "bf16" and n > k else k
    fixed = TILE_BYTES + KEY_CHUNK * width * 4  # the score tile and a unit key chunk
    return queries_per_block(cp, len(q), m, k, width, fixed=fixed, limit=limit)


def topk_cupy(queries, keys, k: int, chunk=None, *, precision: str = "fp32"):
    """:func:`mclx.kernels.topk_cosine` on the CuPy kernels: (scores, int64 indices),
    queries in blocks whose scratch fits the free memory (:func:`_block`)."""
    cp = sys.modules["cupy"]
    with cp.cuda.Device(keys.device.id):
        q, keys, _ = _prepare(queries, keys, k)
        step = _block(cp, q, keys, k, precision)
        parts = [
            neighbours(q[s : s + step], keys, k, chunk=chunk, mode=precision)[:2]
            for s in range(0, max(len(q), 1), step)  # one call when empty
        ]
        if len(parts) == 1:
            s, i = parts[0]
        else:
            s, i = (cp.concatenate([p[j] for p in parts]) for j in (0, 1))
        return _like(s, queries), _like(i.astype(np.int64), queries)


def retrieve_cupy(
    queries, keys, values, k: int, *, distance="l2", weighting="inverse_square",
    chunk=None, precision: str = "fp32", query_block: int = 16384,
):  # fmt: skip
    """:func:`mclx.kernels.retrieve` on the CuPy kernels, ``query_block`` queries at a
    time at most (fewer where their scratch would not fit: ``gpu_memory``)."""
    cp = sys.modules["cupy"]
    order = 2 if distance == "l2" else 1
    with cp.cuda.Device(keys.device.id):
        q, keys, vals = _prepare(queries, keys, k, values)
        step = _block(cp, q, keys, k, precision, limit=query_block)
        out = []
        for s in range(0, len(q), step):
            _, idx, dist = neighbours(q[s : s + step], keys, k, chunk=chunk,
                                      mode=precision, order=order)  # fmt: skip
            out.append(aggregate(dist, idx, vals, weighting))
        pred = cp.concatenate(out) if out else cp.zeros((0, vals.shape[1]), cp.float32)
        if not bool(cp.isfinite(pred).all()):
            msg = "values contain NaN or infinite values in rows chosen as neighbours"
            raise ValueError(msg)
        return _like(pred, queries)
