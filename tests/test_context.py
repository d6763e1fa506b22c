"""A spot's neighbourhood (``--context-radius``, issue #28): the neighbours and weights
of a hand-built grid against a float64 double loop, the radius in µm on two scans of the
same tissue at different µm/px, the features each model reads in training and in a fold,
the refusal to run a context-trained model where the neighbourhood is not applied, and
``--context-mode concat``: [own, wide, mean of the other spots] against a double loop."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from mclx.training.context import neighbour_weights, pool, section_features, section_xy_um

PITCH_UM = 100.0  # a 4 x 3 grid of spots 100 µm apart: diagonal neighbours at 141.4 µm


def _grid_um() -> np.ndarray:
    return np.array([[x * PITCH_UM, y * PITCH_UM] for y in range(3) for x in range(4)])


def _section(mpp: float, xy_um: np.ndarray) -> SimpleNamespace:
    """An AnnData-like section: pixel coordinates of the layout scanned at ``mpp``."""
    return SimpleNamespace(uns={"mpp": mpp, "section": "S"}, obsm={"spatial": xy_um / mpp})


def _brute(xy_um: np.ndarray, radius: float) -> np.ndarray:
    """Dense float64 weights by a double loop: the spots within ``radius`` (itself
    included) weighted exp(-2 (d / R)^2), rows summing to one."""
    n = len(xy_um)
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d = math.dist(xy_um[i], xy_um[j])
            if d <= radius:
                w[i, j] = math.exp(-2 * (d / radius) ** 2)
        w[i] /= w[i].sum()
    return w


@pytest.mark.parametrize(
    ("radius", "corner", "inner"),
    [
        (120.0, {0, 1, 4}, {1, 4, 6, 9, 5}),  # the orthogonal neighbours only
        (150.0, {0, 1, 4, 5}, {0, 1, 2, 4, 5, 6, 8, 9, 10}),  # diagonals at 141 µm too
    ],
)
def test_neighbours_are_what_the_positions_say_at_any_scale(radius, corner, inner):
    """Spot 0 (a corner) and spot 5 (inside) have the neighbours the layout gives them,
    whether the same tissue is scanned at 0.25 or 2 µm/px (pixel distances 8x apart)."""
    expected = _brute(_grid_um(), radius)
    for mpp in (0.25, 2.0):
        xy = section_xy_um(_section(mpp, _grid_um()))
        w = neighbour_weights(xy, radius).toarray()
        assert set(np.flatnonzero(w[0])) == corner
        assert set(np.flatnonzero(w[5])) == inner
        np.testing.assert_allclose(w, expected, rtol=1e-12, atol=1e-15)
        assert w[5, 5] > w[5, 6] > 0  # the spot itself weighs most
    # the radius is in µm, not pixels: at 2 µm/px the pixel grid's pitch is 50
    pixels = _section(2.0, _grid_um()).obsm["spatial"]
    assert set(np.flatnonzero(neighbour_weights(pixels, radius).toarray()[5])) != inner


def test_pool_is_the_weighted_mean_of_each_neighbourhood():
    """Pooled features (N, F) and per-view features (N, V, F) against the dense loop;
    a spot alone within the radius keeps its own features."""
    rng = np.random.default_rng(0)
    xy = np.vstack([_grid_um(), [[5000.0, 5000.0]]])  # the last spot has no neighbour
    feats = rng.normal(size=(len(xy), 2, 5)).astype(np.float32)
    w = _brute(xy, 150.0)
    expected = np.einsum("ij,jvf->ivf", w, feats.astype(np.float64))
    out = pool(feats, xy, 150.0)
    assert out.dtype == np.float32 and out.shape == feats.shape
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[-1], feats[-1])
    with pytest.raises(ValueError, match="positive"):
        pool(feats, xy, 0.0)


def test_a_section_without_a_scale_is_refused():
    with pytest.raises(ValueError, match="µm/px is unknown"):
        section_xy_um(SimpleNamespace(uns={"section": "S"}, obsm={"spatial": _grid_um()}))


class _Cache:
    """A feature cache stand-in: fixed features per section."""

    def __init__(self, adatas, feats):
        self.adatas, self.feats = adatas, feats

    def features(self, encoder, section, pre, **kw):
        return self.feats[section]


def test_section_features_pool_on_the_sections_own_scale():
    """Two scans of one layout at different µm/px give the same pooled features; a model
    without a radius reads the cache's features unchanged."""
    rng = np.random.default_rng(1)
    f = rng.normal(size=(12, 4)).astype(np.float32)
    adatas = {"A": _section(0.5, _grid_um()), "B": _section(1.7, _grid_um())}
    cache = _Cache(adatas, {"A": f, "B": f})
    model = SimpleNamespace(cfg=SimpleNamespace(context_radius_um=150.0), image_encoder=None)
    a = section_features(cache, model, "A", None)
    np.testing.assert_allclose(a, section_features(cache, model, "B", None), rtol=1e-6)
    np.testing.assert_allclose(a, _brute(_grid_um(), 150.0) @ f, rtol=1e-5, atol=1e-6)
    plain = SimpleNamespace(cfg=SimpleNamespace(context_radius_um=0.0), image_encoder=None)
    assert section_features(cache, plain, "A", None) is f


def _brute_others(xy_um: np.ndarray, radius: float) -> np.ndarray:
    """Dense float64 weights of the OTHER spots within ``radius`` (double loop), rows
    summing to one; a spot with no other spot within it: weight 1 on itself."""
    n = len(xy_um)
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d = math.dist(xy_um[i], xy_um[j])
            if j != i and d <= radius:
                w[i, j] = math.exp(-2 * (d / radius) ** 2)
        if w[i].sum() == 0:
            w[i, i] = 1.0
        w[i] /= w[i].sum()
    return w


class _WideCache(_Cache):
    """The stand-in with a second set of features for the wide field of view."""

    def __init__(self, adatas, feats, wide):
        super().__init__(adatas, feats)
        self.wide, self.asked = wide, []

    def features(self, encoder, section, pre, *, fov_um=0.0, **kw):
        self.asked.append(fov_um)
        return self.wide[section] if fov_um else self.feats[section]


def _cfg(**kw) -> SimpleNamespace:
    base = {"context_radius_um": 0.0, "context_mode": "mean", "context_fov_um": 0.0}
    return SimpleNamespace(cfg=SimpleNamespace(**{**base, **kw}), image_encoder=None)


def test_concat_joins_own_wide_and_the_others_mean():
    """``concat``: [own, mean of the OTHER spots] against the double loop (an isolated
    spot: its own features twice); with a wide field: [own, wide, others]; ``mean``
    with a wide field pools both blocks; the width is what the heads are sized for."""
    from mclx.config import context_blocks

    rng = np.random.default_rng(2)
    xy = np.vstack([_grid_um(), [[5000.0, 5000.0]]])
    f = rng.normal(size=(len(xy), 4)).astype(np.float32)
    g = rng.normal(size=(len(xy), 4)).astype(np.float32)
    cache = _WideCache({"A": _section(0.5, xy)}, {"A": f}, {"A": g})
    others = _brute_others(xy, 150.0) @ f.astype(np.float64)
    assert np.abs(others - _brute(xy, 150.0) @ f).max() > 0.1  # not the mean with itself
    model = _cfg(context_radius_um=150.0, context_mode="concat")
    out = section_features(cache, model, "A", None)
    np.testing.assert_array_equal(out[:, :4], f)
    np.testing.assert_allclose(out[:, 4:], others, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[-1, 4:], f[-1])
    assert cache.asked == [0.0] and context_blocks(model.cfg) == 2
    model = _cfg(context_radius_um=150.0, context_mode="concat", context_fov_um=600.0)
    out = section_features(cache, model, "A", None)
    assert out.shape == (13, 12) and context_blocks(model.cfg) == 3
    np.testing.assert_array_equal(out[:, :8], np.concatenate([f, g], axis=1))
    np.testing.assert_allclose(out[:, 8:], others, rtol=1e-5, atol=1e-6)
    assert cache.asked[-1] == 600.0
    model = _cfg(context_radius_um=150.0, context_fov_um=600.0)
    out = section_features(cache, model, "A", None)
    w = _brute(xy, 150.0)
    np.testing.assert_allclose(out, np.hstack([w @ f, w @ g]), rtol=1e-5, atol=1e-6)
    assert context_blocks(model.cfg) == 2


def test_concat_without_a_radius_or_an_unknown_mode_is_refused():
    cache = _Cache({"A": _section(0.5, _grid_um())}, {"A": np.zeros((12, 2), np.float32)})
    with pytest.raises(ValueError, match="give a radius"):
        section_features(cache, _cfg(context_mode="concat"), "A", None)
    with pytest.raises(ValueError, match="not one of mean, concat"):
        section_features(cache, _cfg(context_radius_um=150.0, context_mode="sum"), "A", None)
