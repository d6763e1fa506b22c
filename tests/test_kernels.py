"""Retrieval kernel against a float64 brute-force reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mclx.kernels import neighbour_weights, retrieve, retrieve_reference, topk_cosine


def _data(seed, q=7, n=53, d=16, g=5):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(q, d)).astype(np.float32),
        rng.normal(size=(n, d)).astype(np.float32),
        rng.gamma(1.0, size=(n, g)).astype(np.float32),
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [None, 1, 10, 53, 100])
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_matches_reference(chunk, distance, precision):
    q, keys, vals = _data(0)
    for k in (1, 5, 53):
        pred = retrieve(q, keys, vals, k, distance=distance, chunk=chunk, precision=precision)
        ref, ref_idx = retrieve_reference(q, keys, vals, k, distance=distance)
        np.testing.assert_allclose(pred, ref, rtol=1e-5, atol=1e-6)
        _, idx = topk_cosine(q, keys, k, chunk=chunk, precision=precision)
        np.testing.assert_array_equal(np.sort(idx, 1), np.sort(ref_idx, 1))


@pytest.mark.parametrize("clustered", [False, True])
def test_bf16_candidates_with_float32_rerank_are_exact(clustered):
    """A bank large enough that bf16 keeps only m < N candidates; clustered keys make
    bf16 scores tie so the float32 fallback must kick in."""
    rng = np.random.default_rng(5)
    q = rng.normal(size=(40, 32)).astype(np.float32)
    keys = rng.normal(size=(3000, 32)).astype(np.float32)
    if clustered:  # all keys within ~1e-2 cosine of query 0: below bf16 resolution
        keys = q[0] + rng.normal(scale=0.1, size=keys.shape).astype(np.float32)
    vals = rng.normal(size=(3000, 4)).astype(np.float32)
    s32, i32 = topk_cosine(q, keys, 20, chunk=700, precision="fp32")
    s16, i16 = topk_cosine(q, keys, 20, chunk=700, precision="bf16")
    np.testing.assert_array_equal(i16, i32)
    np.testing.assert_allclose(s16, s32, rtol=1e-6)
    ref, ref_idx = retrieve_reference(q, keys, vals, 20)
    np.testing.assert_array_equal(np.sort(i32, 1), np.sort(ref_idx, 1))
    pred = retrieve(q, keys, vals, 20, chunk=700, precision="bf16")
    np.testing.assert_allclose(pred, ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    q=st.integers(1, 9),
    n=st.integers(1, 60),
    d=st.integers(1, 12),
    seed=st.integers(0, 10**6),
    chunk=st.integers(1, 70),
    data=st.data(),
)
def test_property_same_neighbours_and_predictions(q, n, d, seed, chunk, data):
    k = data.draw(st.integers(1, n))
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(q, d)).astype(np.float32)
    keys = rng.normal(size=(n, d)).astype(np.float32)
    if n > 2:
        keys[1] = keys[0]  # duplicate bank rows
    vals = rng.normal(size=(n, 3)).astype(np.float32)
    precision = data.draw(st.sampled_from(["fp32", "bf16"]))
    scores, idx = topk_cosine(queries, keys, k, chunk=chunk, precision=precision)
    ref_pred, ref_idx = retrieve_reference(queries, keys, vals, k)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    sims = qn.astype(np.float64) @ kn.T.astype(np.float64)
    for i in range(q):  # same neighbour set up to float32 near-ties at the k-th score
        kth = np.sort(sims[i])[::-1][k - 1]
        sure = set(np.flatnonzero(sims[i] > kth + 1e-5))
        assert sure <= set(idx[i].tolist())
        assert np.all(sims[i, idx[i]] >= kth - 1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # sorted, best first
    if all(set(idx[i]) == set(ref_idx[i]) for i in range(q)):
        pred = retrieve(queries, keys, vals, k, chunk=chunk, precision=precision)
        np.testing.assert_allclose(pred, ref_pred, rtol=1e-5, atol=1e-5)


def test_exact_match_takes_all_weight():
    q, keys, vals = _data(1)
    q[0] = keys[4] * 1.0
    pred = retrieve(q, keys, vals, 10)
    assert np.isfinite(pred).all()
    np.testing.assert_allclose(pred[0], vals[4], rtol=1e-6)
    w = neighbour_weights(np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 4.0]]))
    np.testing.assert_allclose(w, [[0.5, 0.5, 0.0], np.array([1, 0.25, 1 / 16]) / 1.3125])


def test_mean_weighting_averages():
    q, keys, vals = _data(2)
    _, idx = topk_cosine(q, keys, 6)
    pred = retrieve(q, keys, vals, 6, weighting="mean")
    np.testing.assert_allclose(pred, vals[idx].mean(1), rtol=1e-6)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (dict(k=54), "between 1 and the bank size"),
        (dict(k=0), "between 1"),
        (dict(keys=np.zeros((0, 16), np.float32)), "empty"),
        (dict(keys=np.ones((53, 15), np.float32)), "width"),
        (dict(queries=np.full((2, 16), np.nan, np.float32)), "NaN"),
        (dict(distance="cosine"), "unknown distance"),
        (dict(keys=np.full((53, 16), np.inf, np.float32)), "keys contain NaN"),
        (dict(values=np.full((53, 5), np.nan, np.float32)), "values contain NaN"),
    ],
)
def test_bad_arguments(args, match):
    q, keys, vals = _data(3)
    kw = dict(queries=q, keys=keys, values=vals, k=5) | args
    if "keys" in args and len(args["keys"]) == 0:
        kw["values"] = vals[:0]
    with pytest.raises(ValueError, match=match):
        retrieve(kw.pop("queries"), kw.pop("keys"), kw.pop("values"), kw.pop("k"), **kw)


@pytest.mark.gpu
def test_cupy_path_matches_numpy():
    cp = pytest.importorskip("cupy", reason="CuPy not installed (pip install .[gpu])")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception:
        pytest.skip("no CUDA device")
    q, keys, vals = _data(4)
    got = retrieve(cp.asarray(q), cp.asarray(keys), cp.asarray(vals), 9, chunk=10)
    np.testing.assert_allclose(cp.asnumpy(got), retrieve(q, keys, vals, 9), rtol=1e-5)
