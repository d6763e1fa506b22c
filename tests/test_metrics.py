import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, mean_squared_error

from mclx.evaluation.metrics import pearson_per_gene, score, top_expressed


def test_pearson_matches_scipy():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(50, 12))
    pred = true * rng.uniform(-1, 1, 12) + rng.normal(size=(50, 12))
    r = pearson_per_gene(pred.astype(np.float32), true.astype(np.float32))
    for g in range(12):
        assert r[g] == pytest.approx(pearsonr(pred[:, g], true[:, g])[0], abs=1e-6)


def test_constant_gene_is_dropped_not_zero():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(30, 4))
    true[:, 2] = 1.0  # constant truth: PCC undefined
    pred = true + rng.normal(scale=0.1, size=true.shape)
    s = score(pred, true)
    r = s["pcc_genes"]
    assert np.isnan(r[2])
    expected = np.mean([pearsonr(pred[:, g], true[:, g])[0] for g in (0, 1, 3)])
    assert s["pcc_acg"] == pytest.approx(expected, abs=1e-9)


def test_mse_mae_match_sklearn():
    rng = np.random.default_rng(2)
    true, pred = rng.normal(size=(40, 7)), rng.normal(size=(40, 7))
    s = score(pred, true)
    assert s["mse"] == pytest.approx(mean_squared_error(true, pred))
    assert s["mae"] == pytest.approx(mean_absolute_error(true, pred))


def test_heg_uses_top_mean_true_genes():
    rng = np.random.default_rng(3)
    true = rng.normal(size=(60, 100)) + np.linspace(0, 10, 100)  # gene g has mean ~ g/10
    pred = rng.normal(size=true.shape)
    assert set(top_expressed(true, 50)) == set(range(50, 100))
    s = score(pred, true)
    expected = np.mean([pearsonr(pred[:, g], true[:, g])[0] for g in range(50, 100)])
    assert s["pcc_heg"] == pytest.approx(expected, abs=1e-9)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="equal 2-d shapes"):
        pearson_per_gene(np.zeros((3, 2)), np.zeros((3, 3)))
