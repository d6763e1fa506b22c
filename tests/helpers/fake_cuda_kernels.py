"""numpy twins of the CUDA kernels in ``kernels/cuda/retrieval.cu``, and a launcher
that checks every launch against the kernels' C signatures.

With :func:`helpers.fake_gpu.install` they let the host side of the GPU retrieval path
(:mod:`mclx.kernels.gpu_select`: tiling, running state, the bf16 proof and its float32
redo, weights and aggregation, array types) run on a CPU. Each twin does what its
kernel's comment says, the buffer cuts of ``select_topm`` included; the launcher refuses
an argument whose type differs from the kernel's parameter (a Python int where the
kernel takes ``int``, a float64 array for a ``float*``) and a wrong number of arguments.
The CUDA code itself runs only on a GPU (``gpu`` marked tests, ``make gpu-check``).
"""

from __future__ import annotations

import re

import numpy as np

from helpers.fake_gpu import FakeCuPyArray

BLOCK, CAP = 256, 2048
_CTYPES = {
    "float": np.float32,
    "int": np.int32,
    "unsigned short": np.uint16,
    "long long": np.int64,
}


def signatures(source: str) -> dict[str, list[tuple[str, bool, str]]]:
    """``extern "C" __global__`` kernels of a CUDA source: name -> [(C type, pointer,
    parameter name)]."""
    out = {}
    pattern = r'extern "C" __global__ void (\w+)\(([^)]*)\)'
    for name, params in re.findall(pattern, source):
        parsed = []
        for param in params.split(","):
            words = param.replace("*", " * ").replace("__restrict__", "").split()
            pointer = "*" in words
            words = [w for w in words if w not in ("const", "*")]
            parsed.append((" ".join(words[:-1]), pointer, words[-1]))
        out[name] = parsed
    return out


# threads (x, y) each kernel needs to cover its work, from its int parameters
_NEEDS = {
    "unit_rows_f32": lambda p: (32 * p["rows"], 1),
    "unit_rows_bf16": lambda p: (32 * p["rows"], 1),
    "select_topm": lambda p: (BLOCK * p["rows"], 1),
    "finish_topm": lambda p: (BLOCK * p["rows"], 1),
    "rescore": lambda p: (32 * p["rows"] * p["m"], 1),
    "best_k": lambda p: (BLOCK * p["rows"], 1),
    "weights_rows": lambda p: (p["rows"], 1),
    "aggregate_rows": lambda p: (BLOCK * p["rows"], p["genes"]),
}


def _rows_sorted(s, i):
    """Row order: score descending, then index ascending."""
    return np.lexsort((i, -s.astype(np.float64)))


def unit_rows_f32(src, out, err, rows, width):
    ss = (src * src).sum(1, dtype=np.float32)
    out[...] = src * (np.float32(1) / np.maximum(np.sqrt(ss), np.float32(1e-12)))[:, None]
    err[...] = ss


def _bf16_bits(u):
    b = u.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def unit_rows_bf16(src, out, err, rows, width):
    with np.errstate(invalid="ignore", over="ignore"):
        ss = (src * src).sum(1, dtype=np.float32)
        u = src * (np.float32(1) / np.maximum(np.sqrt(ss), np.float32(1e-12)))[:, None]
        bits = _bf16_bits(np.nan_to_num(u))
        back = (bits.astype(np.uint32) << 16).view(np.float32)
        e = np.sqrt(((back - u) ** 2).sum(1, dtype=np.float32))
    out[...] = bits
    err[...] = np.where(np.isfinite(ss), e, ss)


def select_topm(scores, rows, cols, ld, start, buf_s, buf_i, count, tau, m):
    for r in range(rows):
        n, t = int(count[r]), np.float32(tau[r])
        s, i = list(buf_s[r, :n]), list(buf_i[r, :n])
        for base in range(0, cols, BLOCK):
            part = scores[r, base : min(base + BLOCK, cols)]
            for c in np.flatnonzero(part > t):
                s.append(part[c])
                i.append(start + base + c)
            assert len(s) <= CAP, "buffer overflow"
            if len(s) > CAP - BLOCK:
                o = _rows_sorted(np.array(s), np.array(i))[:m]
                s, i = [s[j] for j in o], [i[j] for j in o]
                t = np.float32(s[m - 1])
        count[r], tau[r] = len(s), t
        buf_s[r, : len(s)], buf_i[r, : len(i)] = s, i


def finish_topm(buf_s, buf_i, count, out_s, out_i, rows, m):
    for r in range(rows):
        n = int(count[r])
        o = _rows_sorted(buf_s[r, :n], buf_i[r, :n])[:m]
        out_s[r], out_i[r] = buf_s[r, o], buf_i[r, o]


def rescore(q, keys, cand, cos, dist, rows, m, width, order):
    nb = keys[cand]  # (rows, m, width)
    qr = q[:, None, :]
    dot = (nb * qr).sum(2, dtype=np.float32)
    qn = np.maximum(np.sqrt((q * q).sum(1, dtype=np.float32)), np.float32(1e-12))[:, None]
    kn = np.maximum(np.sqrt((nb * nb).sum(2, dtype=np.float32)), np.float32(1e-12))
    cos[...] = dot / (qn * kn)
    diff = nb - qr
    d = (diff * diff).sum(2, dtype=np.float32) if order == 2 else np.abs(diff).sum(2)
    dist[...] = np.sqrt(d) if order == 2 else d


def best_k(cos, cand, dist, out_cos, out_idx, out_dist, rows, m, k):
    for r in range(rows):
        o = _rows_sorted(cos[r], cand[r])[:k]
        out_cos[r], out_idx[r], out_dist[r] = cos[r, o], cand[r, o], dist[r, o]


def weights_rows(dist, w, rows, k, mean):
    d = dist.astype(np.float64)
    if mean:
        w[...] = 1.0 / k
        return
    dmin = d.min(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(dmin == 0, (d == 0).astype(np.float64), (dmin / d) ** 2)
    w[...] = v / v.sum(1, keepdims=True)


def aggregate_rows(w, idx, values, out, rows, k, genes):
    out[...] = np.einsum("rk,rkg->rg", w, values[idx], dtype=np.float32)


class FakeKernels:
    """Stands in for :class:`mclx.kernels.gpu_select.Kernels` on fake CuPy arrays."""

    def __init__(self, cp, source: str) -> None:
        self.cp, self.signatures, self.launches = cp, signatures(source), []

    def launch(self, name: str, grid: tuple, block: tuple, *args) -> None:
        params = self.signatures[name]
        assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)}"
        assert block == (BLOCK,) and all(g >= 1 for g in grid), (name, grid, block)
        ints = {p[2]: int(a) for a, p in zip(args, params) if not p[1]}
        need = _NEEDS[name](ints)
        have = (grid[0] * BLOCK, (grid[1] if len(grid) > 1 else 1) * BLOCK)
        if name != "aggregate_rows":  # its y threads are genes, x blocks rows
            have = (have[0], 1)
        assert have[0] >= need[0] and have[1] >= need[1], f"{name}: grid {grid} for {need}"
        for n, (arg, (ctype, pointer, _)) in enumerate(zip(args, params)):
            want = _CTYPES[ctype]
            if pointer:
                assert isinstance(arg, FakeCuPyArray), f"{name} argument {n}: not an array"
                assert arg.a.dtype == want, f"{name} argument {n}: {arg.a.dtype} for {ctype}*"
                assert arg.a.flags.c_contiguous, f"{name} argument {n}: not contiguous"
            else:
                assert type(arg) is want, f"{name} argument {n}: {type(arg)} for {ctype}"
        self.launches.append(name)
        globals()[name](*(a.a if isinstance(a, FakeCuPyArray) else a for a in args))

    def gemm(self, q, keys, out, bf16: bool) -> None:
        def values(x):
            if not bf16:
                assert x.a.dtype == np.float32
                return x.a
            assert x.a.dtype == np.uint16
            return (x.a.astype(np.uint32) << 16).view(np.float32)

        assert out.a.dtype == np.float32 and out.a.shape == (len(q), len(keys))
        self.launches.append("gemm")
        out.a[...] = values(q) @ values(keys).T
