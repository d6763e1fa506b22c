"""The GPU retrieval kernels (issue 11).

- Every CUDA source compiles with NVRTC for every target architecture, here, without a
  GPU; a typo fails the test suite.
- The host side of the GPU path (:mod:`mclx.kernels.gpu_select`) runs on numpy twins of
  the kernels (``helpers.fake_cuda_kernels``) whose launches are checked against the
  kernels' C signatures, and is compared with the float64 reference.
- The self-check: kernels that disagree with the torch path are set aside with one
  warning.
- On a GPU (``needs("cupy")``): the real kernels against the CPU float32 result.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import fake_gpu, needs
from helpers.fake_cuda_kernels import FakeKernels, signatures

from mclx.kernels import gpu_select, retrieve, retrieve_reference, topk_cosine
from mclx.kernels.nvrtc import ARCHS, CudaCompileError, compile_source, source, sources


@pytest.mark.parametrize("arch", ARCHS)
def test_every_cuda_source_compiles_without_a_gpu(arch):
    """NVRTC alone (cuda-bindings + the nvidia-cuda-nvrtc wheel, both in the dev extra):
    no driver, no device. Not skipped: a machine that cannot compile fails here."""
    found = sources()
    assert "retrieval.cu" in found
    for name, text in found.items():
        assert len(compile_source(text, name, arch)) > 1000, name
    # NVRTC writes its (here one-byte) log into the buffer it is given: a bytes buffer
    # would have been CPython's shared b" ", breaking every later torch.load in-process
    assert b" " == bytes([32]) and b" ".decode() == " "


def test_a_typo_in_a_kernel_fails_to_compile():
    broken = source("retrieval.cu").replace("atomicAdd(&n, 1)", "atomicAd(&n, 1)")
    undefined = r'retrieval\.cu\(\d+\): error: identifier "atomicAd" is undefined'
    with pytest.raises(CudaCompileError, match=undefined):
        compile_source(broken, "retrieval.cu", "sm_90")
    assert len(compile_source(source("retrieval.cu"), "retrieval.cu", "compute_90")) > 1000


# --- the host side on numpy twins of the kernels --------------------------------------


@pytest.fixture
def fake_kernels(monkeypatch):
    """Fake CuPy, kernels twinned in numpy, small tiles and chunks (several of each), and
    the self-check taken as passed for GPU 0."""
    _, cp = fake_gpu.install(monkeypatch, trt_major=None)
    ops = FakeKernels(cp, source("retrieval.cu"))
    monkeypatch.setattr(gpu_select, "_kernels", ops)
    monkeypatch.setattr(gpu_select, "_checked", {0: True})
    monkeypatch.setattr(gpu_select, "TILE_COLS", 700)
    monkeypatch.setattr(gpu_select, "TILE_BYTES", 4 * 700 * 16)
    return cp, ops


def _data(seed=0, q=40, n=3000, d=24, g=5):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, d)).astype(np.float32)
    keys[7] = keys[3]  # a tie
    return (
        rng.normal(size=(q, d)).astype(np.float32),
        keys,
        rng.gamma(1.0, size=(n, g)).astype(np.float32),
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize(("k", "chunk"), [(1, None), (25, 1100), (300, None)])
def test_gpu_path_matches_the_float64_reference(fake_kernels, precision, distance, k, chunk):
    """Through the public API: a CuPy bank runs gpu_select (query tiles, key chunks,
    buffer cuts: 3000 keys overflow the 2048-entry buffer); results come back as the
    queries' array type."""
    cp, ops = fake_kernels
    q, keys, vals = _data()
    bank = (cp.asarray(keys), cp.asarray(vals))
    pred = retrieve(cp.asarray(q), *bank, k, distance=distance, chunk=chunk, precision=precision)
    assert isinstance(pred, cp.ndarray) and "select_topm" in ops.launches
    ref, ref_idx = retrieve_reference(q, keys, vals, k, distance=distance)
    np.testing.assert_allclose(pred.get(), ref, rtol=1e-5, atol=1e-6)
    scores, idx = topk_cosine(q, bank[0], k, chunk=chunk, precision=precision)
    assert isinstance(idx, np.ndarray) and idx.dtype == np.int64
    np.testing.assert_array_equal(np.sort(idx, 1), np.sort(ref_idx, 1))
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert set(ops.launches) - {"gemm"} <= set(signatures(source("retrieval.cu")))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_queries_go_in_blocks_whose_scratch_fits_the_free_memory(
    fake_kernels, monkeypatch, precision
):
    """~16 KiB of scratch a query: a million queries in one call asked ~16 GiB. With
    room for 7 queries' scratch, 40 queries go in 6 blocks, and the answers are those
    of one block."""
    from mclx.kernels import gpu_memory
    from mclx.kernels.bf16 import bf16_candidates

    cp, _ = fake_kernels
    q, keys, vals = _data(2)
    k, width = 25, q.shape[1]
    m = k if precision == "fp32" else bf16_candidates(k)
    fixed = gpu_select.TILE_BYTES + gpu_select.KEY_CHUNK * width * 4
    per_query = gpu_memory.query_scratch_bytes(m, k, width)
    assert per_query > 16 * 1024
    blocks, neighbours = [], gpu_select.neighbours

    def counted(qq, *args, mode, **kw):
        if mode == precision:  # not the float32 redo of unproven bf16 rows
            blocks.append(len(qq))
        return neighbours(qq, *args, mode=mode, **kw)

    monkeypatch.setattr(gpu_select, "neighbours", counted)
    whole = topk_cosine(q, cp.asarray(keys), k, precision=precision)
    pred = retrieve(q, cp.asarray(keys), cp.asarray(vals), k, precision=precision)
    assert blocks == [40, 40]  # one block each (free: 70 GB)
    cp.free_bytes = int((7 * per_query + fixed) / gpu_memory.SCRATCH_FRACTION) + 3
    blocks.clear()
    blocked = topk_cosine(q, cp.asarray(keys), k, precision=precision)
    again = retrieve(q, cp.asarray(keys), cp.asarray(vals), k, precision=precision)
    assert blocks == [7, 7, 7, 7, 7, 5] * 2
    np.testing.assert_array_equal(blocked[1], whole[1])
    np.testing.assert_array_equal(blocked[0], whole[0])
    np.testing.assert_array_equal(again, pred)
    cp.free_bytes = 0  # nothing free: still one query at a time, not an error
    assert gpu_memory.queries_per_block(cp, 40, m, k, width, fixed=fixed) == 1


def test_bf16_candidates_that_are_not_proven_are_redone_in_float32(fake_kernels):
    cp, ops = fake_kernels
    rng = np.random.default_rng(5)
    q = rng.normal(size=(12, 32)).astype(np.float32)
    keys = (q[0] + rng.normal(scale=0.1, size=(3000, 32))).astype(np.float32)
    i32 = topk_cosine(q, cp.asarray(keys), 20, precision="fp32")[1]
    ops.launches.clear()
    i16 = topk_cosine(q, cp.asarray(keys), 20, precision="bf16")[1]
    np.testing.assert_array_equal(i16, i32)
    assert ops.launches.index("unit_rows_bf16") < ops.launches.index("unit_rows_f32")
    vals = rng.normal(size=(3000, 3)).astype(np.float32)
    pred = retrieve(q, cp.asarray(keys), cp.asarray(vals), 20, precision="bf16")
    np.testing.assert_allclose(pred, retrieve_reference(q, keys, vals, 20)[0], rtol=1e-5)
    # every kernel of the source was launched, each with its C signature
    assert set(ops.launches) - {"gemm"} == set(signatures(source("retrieval.cu")))


def test_weights_mean_and_exact_matches(fake_kernels):
    cp, _ = fake_kernels
    q, keys, vals = _data(1, n=500)
    q[0] = keys[4]
    pred = retrieve(q, cp.asarray(keys), cp.asarray(vals), 10)
    np.testing.assert_allclose(pred[0], vals[4], rtol=1e-6)
    mean = retrieve(q, cp.asarray(keys), cp.asarray(vals), 6, weighting="mean")
    _, idx = retrieve_reference(q, keys, vals, 6)
    np.testing.assert_allclose(mean, vals[idx].mean(1), rtol=1e-6)
    got = retrieve(torch.from_numpy(q), cp.asarray(keys), cp.asarray(vals), 6)
    assert isinstance(got, torch.Tensor)
    s, i = topk_cosine(q[:0], cp.asarray(keys), 6)
    assert s.shape == i.shape == (0, 6)
    assert retrieve(q[:0], cp.asarray(keys), cp.asarray(vals), 6).shape == (0, vals.shape[1])


@pytest.mark.parametrize(
    ("what", "match"),
    [("keys", r"keys contain NaN or infinite values \(row 123\)"), ("queries", "queries contain")],
)
def test_nan_inputs_are_refused(fake_kernels, what, match):
    cp, _ = fake_kernels
    q, keys, vals = _data(2, n=500)
    (keys if what == "keys" else q)[123 if what == "keys" else 3, 2] = np.nan
    with pytest.raises(ValueError, match=match):
        retrieve(cp.asarray(q), cp.asarray(keys), cp.asarray(vals), 5)


def test_too_many_candidates_run_the_torch_path(fake_kernels):
    """k above the kernels' buffers (896 in float32): the torch path answers."""
    cp, ops = fake_kernels
    q, keys, vals = _data(3, q=4, n=1200)
    pred = retrieve(cp.asarray(q), cp.asarray(keys), cp.asarray(vals), 1000)
    assert ops.launches == [] and isinstance(pred, cp.ndarray)
    ref, _ = retrieve_reference(q, keys, vals, 1000)
    np.testing.assert_allclose(pred.get(), ref, rtol=1e-5, atol=1e-6)


# --- the self-check -----------------------------------------------------------------


class _WrongAggregation(FakeKernels):
    def launch(self, name, grid, block, *args):
        super().launch(name, grid, block, *args)
        if name == "aggregate_rows":
            args[3].a[...] *= 1.001


def test_self_check_passes_with_faithful_kernels(fake_kernels, monkeypatch):
    monkeypatch.setattr(gpu_select, "_checked", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gpu_select.usable(0)


def test_kernels_that_disagree_are_set_aside_with_one_warning(fake_kernels, monkeypatch):
    cp, _ = fake_kernels
    wrong = _WrongAggregation(cp, source("retrieval.cu"))
    monkeypatch.setattr(gpu_select, "_kernels", wrong)
    monkeypatch.setattr(gpu_select, "_checked", {})
    q, keys, vals = _data(4, n=400)
    with pytest.warns(RuntimeWarning, match="failed their self-check on GPU 0.*predictions differ"):
        pred = retrieve(cp.asarray(q), cp.asarray(keys), cp.asarray(vals), 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and GPU
        again = retrieve(cp.asarray(q), cp.asarray(keys), cp.asarray(vals), 9)
    ref, _ = retrieve_reference(q, keys, vals, 9)
    for got in (pred, again):  # the torch path's answers
        np.testing.assert_allclose(got.get(), ref, rtol=1e-5, atol=1e-6)


def test_kernels_that_fail_to_build_are_set_aside(fake_kernels, monkeypatch):
    def broken():
        raise CudaCompileError("retrieval.cu (sm_90): NVRTC compilation failed")

    monkeypatch.setattr(gpu_select, "_kernels", None)
    monkeypatch.setattr(gpu_select, "Kernels", broken)
    monkeypatch.setattr(gpu_select, "_checked", {})
    with pytest.warns(RuntimeWarning, match="CudaCompileError"):
        assert not gpu_select.usable(0)


# --- on a GPU -----------------------------------------------------------------------


@needs("cupy")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cupy_kernels_on_a_gpu_match_the_cpu_float32_result(precision):
    import cupy as cp

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the self-check must pass
        assert gpu_select.usable(cp.cuda.Device().id)
    rng = np.random.default_rng(11)
    q = rng.normal(size=(513, 256)).astype(np.float32)
    keys = rng.normal(size=(40_000, 256)).astype(np.float32)
    vals = rng.gamma(1.0, size=(40_000, 50)).astype(np.float32)
    want = retrieve(q, keys, vals, 200, precision="fp32")
    _, want_idx = topk_cosine(q, keys, 200, precision="fp32")
    dk, dv = cp.asarray(keys), cp.asarray(vals)
    got = retrieve(cp.asarray(q), dk, dv, 200, precision=precision)
    _, idx = topk_cosine(cp.asarray(q), dk, 200, precision=precision)
    np.testing.assert_array_equal(np.sort(idx.get(), 1), np.sort(want_idx, 1))
    np.testing.assert_allclose(got.get(), want, rtol=1e-5, atol=1e-6)
