"""Retrieval kernel against a float64 brute-force reference, for every array type the
kernel takes (``helpers.ARRAY_TYPES``: numpy, CPU torch tensors, CuPy on a GPU)."""

import numpy as np
import pytest
from helpers import ARRAY_TYPES, as_numpy, needs
from helpers.arrays import same_type
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


@pytest.mark.parametrize("array_type", ARRAY_TYPES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [None, 1, 10, 53, 100])
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_matches_reference(chunk, distance, precision, array_type):
    q, keys, vals = _data(0)
    aq, akeys, avals = map(array_type, (q, keys, vals))
    for k in (1, 5, 53):
        pred = retrieve(aq, akeys, avals, k, distance=distance, chunk=chunk, precision=precision)
        assert same_type(pred, array_type)  # the caller's array type comes back
        ref, ref_idx = retrieve_reference(q, keys, vals, k, distance=distance)
        np.testing.assert_allclose(as_numpy(pred), ref, rtol=1e-5, atol=1e-6)
        _, idx = topk_cosine(aq, akeys, k, chunk=chunk, precision=precision)
        np.testing.assert_array_equal(np.sort(as_numpy(idx), 1), np.sort(ref_idx, 1))


@pytest.mark.parametrize("array_type", ARRAY_TYPES)
@pytest.mark.parametrize("clustered", [False, True])
def test_bf16_candidates_with_float32_rerank_are_exact(clustered, array_type):
    """A bank large enough that bf16 keeps only m < N candidates; clustered keys make
    bf16 scores tie so the float32 fallback must kick in."""
    rng = np.random.default_rng(5)
    q = rng.normal(size=(40, 32)).astype(np.float32)
    keys = rng.normal(size=(3000, 32)).astype(np.float32)
    if clustered:  # all keys within ~1e-2 cosine of query 0: below bf16 resolution
        keys = q[0] + rng.normal(scale=0.1, size=keys.shape).astype(np.float32)
    vals = rng.normal(size=(3000, 4)).astype(np.float32)
    aq, akeys, avals = map(array_type, (q, keys, vals))
    s32, i32 = map(as_numpy, topk_cosine(aq, akeys, 20, chunk=700, precision="fp32"))
    s16, i16 = map(as_numpy, topk_cosine(aq, akeys, 20, chunk=700, precision="bf16"))
    np.testing.assert_array_equal(i16, i32)
    np.testing.assert_allclose(s16, s32, rtol=1e-6)
    ref, ref_idx = retrieve_reference(q, keys, vals, 20)
    np.testing.assert_array_equal(np.sort(i32, 1), np.sort(ref_idx, 1))
    pred = retrieve(aq, akeys, avals, 20, chunk=700, precision="bf16")
    np.testing.assert_allclose(as_numpy(pred), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("array_type", ARRAY_TYPES)
@settings(max_examples=40, deadline=None)
@given(
    q=st.integers(1, 9),
    n=st.integers(1, 60),
    d=st.integers(1, 12),
    seed=st.integers(0, 10**6),
    chunk=st.integers(1, 70),
    data=st.data(),
)
def test_property_same_neighbours_and_predictions(array_type, q, n, d, seed, chunk, data):
    k = data.draw(st.integers(1, n))
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(q, d)).astype(np.float32)
    keys = rng.normal(size=(n, d)).astype(np.float32)
    if n > 2:
        keys[1] = keys[0]  # duplicate bank rows
    vals = rng.normal(size=(n, 3)).astype(np.float32)
    precision = data.draw(st.sampled_from(["fp32", "bf16"]))
    aq, akeys, avals = map(array_type, (queries, keys, vals))
    scores, idx = map(as_numpy, topk_cosine(aq, akeys, k, chunk=chunk, precision=precision))
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
        pred = retrieve(aq, akeys, avals, k, chunk=chunk, precision=precision)
        np.testing.assert_allclose(as_numpy(pred), ref_pred, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("array_type", ARRAY_TYPES)
def test_exact_match_takes_all_weight(array_type):
    q, keys, vals = _data(1)
    q[0] = keys[4] * 1.0
    pred = as_numpy(retrieve(*map(array_type, (q, keys, vals)), 10))
    assert np.isfinite(pred).all()
    np.testing.assert_allclose(pred[0], vals[4], rtol=1e-6)
    w = neighbour_weights(np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 4.0]]))
    np.testing.assert_allclose(w, [[0.5, 0.5, 0.0], np.array([1, 0.25, 1 / 16]) / 1.3125])


@pytest.mark.parametrize("array_type", ARRAY_TYPES)
def test_mean_weighting_averages(array_type):
    q, keys, vals = _data(2)
    aq, akeys, avals = map(array_type, (q, keys, vals))
    idx = as_numpy(topk_cosine(aq, akeys, 6)[1])
    _, ref_idx = retrieve_reference(q, keys, vals, 6)
    np.testing.assert_array_equal(np.sort(idx, 1), np.sort(ref_idx, 1))
    pred = retrieve(aq, akeys, avals, 6, weighting="mean")
    np.testing.assert_allclose(as_numpy(pred), vals[ref_idx].mean(1), rtol=1e-6)


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


# --- the compiled CPU steps (numba) and the paths around them ----------------------


@pytest.fixture(scope="module")
def cs():
    """The numba kernels (tests taking this fixture need("numba"))."""
    from mclx.kernels import cpu_select

    return cpu_select


def _lexsort_topm(scores, m):
    """Best m per row: score descending, ties to the lower index (float64 reference)."""
    return [np.lexsort((np.arange(len(r)), -r.astype(np.float64)))[:m] for r in scores]


@needs("numba")
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tau0", [None, "low", "high"])
def test_select_topm_keeps_best_m_with_index_ties(cs, bf16, tau0):
    """Scores from a small set (many ties, negatives, both zeros) folded in uneven
    column blocks must give exactly the lexsort top-m, ties to the lower index; a
    starting threshold above the m-th score leaves the row short, for the caller."""
    import torch

    rng = np.random.default_rng(0)
    rows, n, m = 6, 1000, 37
    scores = rng.choice([-2.0, -0.5, -0.0, 0.0, 0.25, 0.5, 0.75, 1.0], size=(rows, n))
    scores[0] = rng.normal(size=n)  # no ties in one row
    scores[1, :] = -1.0  # all tied
    t = torch.from_numpy(scores.astype(np.float32))
    dtype, itype, shift, mask = (
        (torch.bfloat16, torch.int16, 15, 0x7FFF)
        if bf16
        else (torch.float32, torch.int32, 31, 0x7FFFFFFF)
    )
    t = t.to(dtype)
    state = cs.state(rows, m)
    if tau0 is not None:
        level = -3.0 if tau0 == "low" else 5.0
        state[3][:] = cs_keys(torch.full((rows,), level).to(dtype), bf16)
    for start, stop in [(0, 1), (1, 64), (64, 65), (65, 700), (700, n)]:
        block = t[:, start:stop].contiguous().view(itype).numpy()
        cs.select_topm(block, *state, start, shift, mask)
    bk, bi, count, _ = state
    if tau0 == "high":
        assert (count < m).all()
        return
    cs.finish_topm(bk, bi, count, m)
    assert (count == m).all()
    ref = _lexsort_topm(t.float().numpy(), m)
    got_scores = cs.key_to_float(bk[:, :m], bf16)
    values = t.float().numpy()
    for r in range(rows):  # the best m values (index sets may differ only at -0 vs +0)
        np.testing.assert_array_equal(np.sort(got_scores[r]), np.sort(values[r][ref[r]]))
        zero_at_boundary = values[r][ref[r][-1]] == 0
        if not zero_at_boundary:
            np.testing.assert_array_equal(np.sort(bi[r, :m]), np.sort(ref[r]))
    np.testing.assert_array_equal(np.sort(bi[1, :m]), np.arange(m))  # all tied: first m


def cs_keys(scores, bf16):
    """Order-preserving int32 selection keys of bf16 / float32 scores (the kernel's)."""
    import torch

    if bf16:
        bits = scores.to(torch.bfloat16).view(torch.int16).numpy().astype(np.int32)
        return bits ^ ((bits >> 15) & 0x7FFF)
    bits = scores.float().contiguous().view(torch.int32).numpy().copy()
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@needs("numba")
def test_bf16_rounding_and_unit_rows_match_torch(cs):
    import torch

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((300, 64)) * np.exp(rng.normal(size=(300, 1)) * 5)).astype(np.float32)
    u32 = np.empty_like(x)
    err = np.empty(len(x), np.float32)
    cs.unit_rows(x, u32, err, False)
    np.testing.assert_allclose(np.linalg.norm(u32, axis=1), 1.0, rtol=1e-6)
    bits = np.empty(x.shape, np.uint16)
    cs.unit_rows(x, bits, err, True)
    ours = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()
    theirs = torch.from_numpy(u32).bfloat16().float()
    assert (ours == theirs).float().mean() > 0.9999  # same rounding (u32 may differ 1 ulp)
    np.testing.assert_allclose(err, (ours - torch.from_numpy(u32)).norm(dim=1), atol=1e-6)
    bad = x.copy()
    bad[3, 5] = np.nan
    cs.unit_rows(bad, bits, err, True)
    assert not np.isfinite(err[3]) and np.isfinite(np.delete(err, 3)).all()
    bad[3, 5] = np.inf
    cs.unit_rows(bad, u32, err, False)
    assert not np.isfinite(err[3]) and np.isfinite(np.delete(err, 3)).all()


@needs("numba")
def test_key_ordered_rescore_and_aggregate_match_float64(cs):
    """bucket_pairs visits every kept (row, candidate) pair once, grouped by bank
    bucket; rescore_pairs and aggregate_by_key give what a plain gather gives."""
    rng = np.random.default_rng(3)
    q = rng.normal(size=(40, 32)).astype(np.float32)
    keys = rng.normal(size=(5000, 32)).astype(np.float32)
    vals = rng.gamma(1.0, size=(5000, 7)).astype(np.float32)
    cand = rng.integers(0, len(keys), (40, 60))
    keep = rng.random(cand.shape) < 0.7
    pairs = cs.bucket_pairs(cand, keep, 8)
    assert sorted(pairs.tolist()) == np.flatnonzero(keep).tolist()
    assert np.all(np.diff(cand.ravel()[pairs] >> 8) >= 0)
    qnorm = np.empty(len(q), np.float32)
    cs.query_norms(q, qnorm)
    nb = keys[cand].astype(np.float64)
    for order in (1, 2):
        cos = np.full(cand.shape, -np.inf, np.float32)
        dist = np.full(cand.shape, np.inf, np.float32)
        cs.in_parallel(cs.rescore_pairs, [pairs], q, qnorm, cand, cos, dist, keys, order)
        want_cos = (nb @ q[:, :, None].astype(np.float64))[..., 0]
        want_cos /= np.linalg.norm(nb, axis=2) * np.linalg.norm(q, axis=1)[:, None]
        want_dist = np.linalg.norm(nb - q[:, None, :], ord=order, axis=2)
        np.testing.assert_allclose(cos[keep], want_cos[keep], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dist[keep], want_dist[keep], rtol=1e-5)
        assert np.all(cos[~keep] == -np.inf) and np.all(dist[~keep] == np.inf)
    w = rng.random(cand.shape).astype(np.float32)
    out = np.empty((len(q), vals.shape[1]), np.float32)
    want = np.einsum("qk,qkg->qg", w.astype(np.float64), vals[cand].astype(np.float64))
    for shift in (8, 63):  # buckets of 256 rows; one bucket: row order
        cs.in_parallel(cs.aggregate_by_key, [w, cand, out], vals, shift)
        np.testing.assert_allclose(out, want, rtol=1e-5)


@needs("numba")
def test_bf16_window_is_the_torch_bound(cs):
    """The compiled bound gives _bf16_sure's rows; it keeps every row's k best and
    nothing of an unsure row (that row is redone in float32)."""
    import torch

    from mclx.kernels.bf16 import BF16_U, bf16_sure

    rng = np.random.default_rng(5)
    approx = torch.from_numpy(rng.normal(size=(200, 50)).astype(np.float32)).bfloat16().float()
    eps = rng.uniform(0, 2, 200)
    sure, keep = np.empty(200, np.bool_), np.empty((200, 50), np.bool_)
    cs.bf16_window(approx.numpy(), eps, sure, keep, 10, BF16_U)
    kth = approx.topk(10, dim=1).values[:, -1]
    want = bf16_sure(kth, approx.min(dim=1).values, torch.from_numpy(eps))
    assert sure.tolist() == want.tolist() and 0 < sure.sum() < 200
    assert not keep[~sure].any() and not keep[sure].all()
    top = np.argsort(-approx.numpy(), axis=1, kind="stable")[:, :10]
    assert np.take_along_axis(keep, top, 1)[sure].all()


@needs("numba")
def test_bf16_rescores_only_the_window_and_stays_exact():
    """With m < N candidates, only those whose bf16 score can reach the k-th are
    re-scored, and the neighbours are still the float32 ones."""
    from mclx.kernels.retrieval import stage_times

    rng = np.random.default_rng(11)
    q = rng.normal(size=(64, 32)).astype(np.float32)
    keys = rng.normal(size=(40_000, 32)).astype(np.float32)
    vals = rng.gamma(1.0, size=(40_000, 5)).astype(np.float32)
    with stage_times() as stages:
        s16, i16 = topk_cosine(q, keys, 20, precision="bf16")
    s32, i32 = topk_cosine(q, keys, 20, precision="fp32")
    np.testing.assert_array_equal(i16, i32)
    np.testing.assert_allclose(s16, s32, rtol=1e-6, atol=1e-7)
    m = 20 + 256
    assert 20 * 64 <= stages["candidates rescored"] < m * 64
    pred = retrieve(q, keys, vals, 20, precision="bf16")
    ref, _ = retrieve_reference(q, keys, vals, 20)
    np.testing.assert_allclose(pred, ref, rtol=1e-5, atol=1e-6)


@needs("numba")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_and_torch_paths_agree(precision, monkeypatch):
    """The numba CPU path and the torch path (GPU's) pick the same neighbours and
    predict the same, on a bank big enough to use the sampled threshold."""
    import mclx.kernels.retrieval as kr

    rng = np.random.default_rng(7)
    q = rng.normal(size=(50, 24)).astype(np.float32)
    keys = rng.normal(size=(6000, 24)).astype(np.float32)
    vals = rng.gamma(1.0, size=(6000, 6)).astype(np.float32)
    compiled = retrieve(q, keys, vals, 40, chunk=2500, precision=precision)
    s_c, i_c = topk_cosine(q, keys, 40, chunk=2500, precision=precision)
    monkeypatch.setattr(kr, "compiled_available", lambda: False)
    plain = retrieve(q, keys, vals, 40, chunk=2500, precision=precision)
    s_t, i_t = topk_cosine(q, keys, 40, chunk=2500, precision=precision)
    np.testing.assert_array_equal(i_c, i_t)
    np.testing.assert_allclose(s_c, s_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(compiled, plain, rtol=1e-5, atol=1e-6)
    ref, _ = retrieve_reference(q, keys, vals, 40)
    np.testing.assert_allclose(compiled, ref, rtol=1e-5, atol=1e-6)


@needs("numba")
def test_sampled_threshold_is_the_rank_th_best_over_column_tiles():
    """The sample is scored in the scan's column tiles (here two); the threshold is still
    each row's 32nd best sample score (as a selection key)."""
    import torch

    import mclx.kernels.compiled_path as kr
    from mclx.kernels.torch_path import unit

    rng = np.random.default_rng(4)
    keys = torch.from_numpy(rng.normal(size=(20_000, 8)).astype(np.float32))
    qd = unit(torch.from_numpy(rng.normal(size=(70, 8)).astype(np.float32)))
    tau = kr._threshold_from_sample(qd, keys, 22, False)
    s = -(-32 * 20_000 // 66)
    assert s > kr.TILE_COLS
    sample = unit(keys[torch.linspace(0, 19_999, s).long()])
    want = torch.topk(qd @ sample.T, 32, dim=1).values[:, -1]
    from mclx.kernels import cpu_select as cs

    got = cs.key_to_float(tau, False)  # products in other shapes may differ in the last bit
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7)


@needs("numba")
def test_rows_whose_sampled_threshold_is_too_high_are_redone(monkeypatch):
    import mclx.kernels.compiled_path as kr

    calls = []

    def too_high(qd, keys, m, bf16):
        calls.append(len(qd))
        return np.full(len(qd), np.iinfo(np.int32).max - 1, np.int32)

    monkeypatch.setattr(kr, "_threshold_from_sample", too_high)
    q, keys, vals = _data(8, q=9, n=500)
    pred = retrieve(q, keys, vals, 30, precision="bf16")
    ref, _ = retrieve_reference(q, keys, vals, 30)
    np.testing.assert_allclose(pred, ref, rtol=1e-5, atol=1e-6)
    assert calls == [9]  # the redo runs without a threshold


@pytest.mark.parametrize("array_type", ARRAY_TYPES)
def test_bf16_bound_holds_on_a_dense_bank(array_type):
    """Many keys within bf16 resolution of the k-th: every query falls back, or the
    bound proves its candidates; either way the float32 neighbours come out."""
    rng = np.random.default_rng(9)
    base = rng.normal(size=64).astype(np.float32)
    keys = (base + rng.normal(scale=0.02, size=(5000, 64))).astype(np.float32)
    q = (base + rng.normal(scale=0.02, size=(30, 64))).astype(np.float32)
    aq, akeys = array_type(q), array_type(keys)
    i32 = as_numpy(topk_cosine(aq, akeys, 25, precision="fp32")[1])
    i16 = as_numpy(topk_cosine(aq, akeys, 25, precision="bf16")[1])
    np.testing.assert_array_equal(i16, i32)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    sims = qn.astype(np.float64) @ kn.T.astype(np.float64)
    for i in range(len(q)):  # cosines ~0.9997 apart by ~1e-7: float32 near-ties
        kth = np.sort(sims[i])[::-1][24]
        assert set(np.flatnonzero(sims[i] > kth + 1e-6)) <= set(i32[i].tolist())
        assert np.all(sims[i, i32[i]] >= kth - 1e-6)


def _kernel_imports() -> dict[str, set[tuple[str, str]]]:
    """``mclx.kernels`` module -> {(module it imports from, name)}, function-local
    imports included (they make cycles too)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "kernels"
    graph: dict[str, set[tuple[str, str]]] = {}
    for path in root.glob("*.py"):
        found = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mclx.kernels"):
                parts = node.module.split(".")
                for alias in node.names:
                    if len(parts) == 2:  # from mclx.kernels import cpu_select
                        found.add((alias.name, ""))
                    else:
                        found.add((parts[2], alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("mclx.kernels."):
                        found.add((alias.name.split(".")[2], ""))
    return graph


def test_kernels_have_no_import_cycle_and_gpu_select_uses_public_names():
    """Issue 24: the retrieval split by role (API and dispatch, torch path, compiled
    path, bf16 bounds, stage timers) has no cycle, and ``gpu_select`` reaches into no
    other module's private names."""
    graph = _kernel_imports()
    assert {"retrieval", "torch_path", "compiled_path", "bf16", "stages"} <= set(graph)
    edges = {m: {t for t, _ in deps if t in graph and t != "__init__"} for m, deps in graph.items()}
    edges["__init__"] = {t for t, _ in graph["__init__"]}
    state: dict[str, int] = {}

    def visit(m, path):
        assert state.get(m) != 1, f"import cycle: {' -> '.join([*path, m])}"
        if state.get(m) == 2:
            return
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            visit(t, [*path, m])
        state[m] = 2

    for m in sorted(edges):
        visit(m, [])
    private = sorted(n for t, n in graph["gpu_select"] if n.startswith("_"))
    assert private == [] and "retrieval" not in edges["gpu_select"]
    lines = {m: len(p.read_text().splitlines()) for m, p in _kernel_paths().items()}
    assert max(lines[m] for m in ("retrieval", "torch_path", "compiled_path")) < 400, lines


def _kernel_paths():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "kernels"
    return {p.stem: p for p in root.glob("*.py")}
