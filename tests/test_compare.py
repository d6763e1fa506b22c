"""The comparison table (``mclx evaluate --model a,b,...``, issue #28) against single
evaluate runs, its shared feature cache, its all-or-nothing outputs; and the context
radius (``--context-radius``) through a fold of ``mclx evaluate`` against an independent
pooling and fit, and refused where the neighbourhood is not applied."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from helpers import tiny_options
from helpers.cli import assert_one_line_error, run_cli

METRICS = ("pcc_acg", "pcc_heg", "pcc_hvg", "mse", "mae")


def test_table_rows_are_the_single_runs(synthetic, tmp_path, capsys, monkeypatch):
    """Each row of the table holds the mean and std of that model's own evaluate run;
    the patches of each section are encoded once for all models and folds."""
    import mclx.inference.embed as embed

    calls = []
    real = embed.encode_features
    monkeypatch.setattr(
        embed, "encode_features", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    opts = tiny_options(synthetic, epochs=2)
    table = tmp_path / "table.csv"
    res = run_cli(capsys, ["evaluate", "--data", synthetic, *opts, "--model", "ridge,knn,mclstexp",
                           "--k", "20", "-q", "--out", table])  # fmt: skip
    assert res.returncode == 0, res.stderr
    # S1, S2, S3 and their 461 µm fields (mclstexp's default recipe reads them): once
    # each, not once per model and fold
    assert len(calls) == 6
    rows = {r["model"]: r for r in csv.DictReader(table.open())}
    assert list(rows) == ["ridge", "knn", "mclstexp"]
    md = table.with_suffix(".md").read_text()
    for model in rows:
        single = tmp_path / f"{model}.json"
        res = run_cli(capsys, ["evaluate", "--data", synthetic, *opts, "--model", model,
                               "--k", "20", "-q", "--out", single])  # fmt: skip
        assert res.returncode == 0, res.stderr
        want = json.loads(single.read_text())
        for m in METRICS:
            assert float(rows[model][m]) == pytest.approx(want["mean"][m], rel=1e-5, abs=1e-7)
            assert float(rows[model][f"{m}_std"]) == pytest.approx(
                want["std"][m], rel=1e-5, abs=1e-7
            )
            assert f"{want['mean'][m]:.3f} ± {want['std'][m]:.3f}" in md
        assert rows[model]["sections"] == "3" and float(rows[model]["seconds"]) > 0
        full = json.loads((tmp_path / f"table.{model}.json").read_text())
        assert full["mean"] == pytest.approx(want["mean"])


def test_a_failing_model_leaves_no_table(synthetic, tmp_path, capsys):
    """ridge runs, then knn's k is refused: one line, and none of the files."""
    opts = tiny_options(synthetic, epochs=2)
    res = run_cli(capsys, ["evaluate", "--data", synthetic, *opts, "--model", "ridge,knn",
                           "--k", "100000", "-q", "--out", tmp_path / "t.csv"])  # fmt: skip
    assert_one_line_error(res, "k=100000")
    assert list(tmp_path.iterdir()) == []
    res = run_cli(capsys, ["evaluate", "--data", synthetic, "--model", "ridge,ridge"])
    assert res.returncode != 0 and "twice" in res.stderr


def _pooled(feats: np.ndarray, xy: np.ndarray, radius: float) -> np.ndarray:
    """Dense float64 double loop: the exp(-2 (d/R)^2)-weighted mean within ``radius``."""
    out = np.zeros(feats.shape, np.float64)
    for i in range(len(xy)):
        w = np.array([math.exp(-2 * (math.dist(xy[i], q) / radius) ** 2)
                      if math.dist(xy[i], q) <= radius else 0.0 for q in xy])  # fmt: skip
        out[i] = w @ feats / w.sum()
    return out


def test_ridge_fold_reads_pooled_features(synthetic):
    """A fold of ridge with --context-radius predicts what PCA + ridge fitted on the
    brute-force pooled training features predicts from the pooled test features."""
    from helpers import tiny_recipe

    from mclx.data.her2st import read_her2st
    from mclx.evaluation.evaluate import cross_validate
    from mclx.models.baselines import fit_pca_ridge
    from mclx.training.features import PatchCache

    radius = 450.0  # the synthetic grid's pitch is 200 µm: the 3 x 3 neighbourhood and more
    recipe = tiny_recipe(synthetic, model="ridge", frozen=True, context_radius_um=radius)
    res = cross_validate(synthetic, recipe, sections=["S1", "S2", "S3"], progress=False)
    adatas = read_her2st(synthetic, ["S1", "S2", "S3"], with_image=True)
    pre, net = recipe.setup(synthetic, adatas, ["S1", "S2"])
    cache = PatchCache(adatas, pre.patch_size)
    pooled = {}
    for s, a in adatas.items():
        f = cache.features(net.image_encoder, s, pre).astype(np.float64)
        pooled[s] = _pooled(f, a.obsm["spatial"] * a.uns["mpp"], radius)
        assert not np.allclose(pooled[s], f)
    table = cache.table(["S1", "S2"], pre)
    pipe, _ = fit_pca_ridge(np.concatenate([pooled["S1"], pooled["S2"]]),
                            np.asarray(table.expr, np.float64),
                            np.asarray(table.section).astype(str),
                            n_components=net.cfg.embed_dim)  # fmt: skip
    got = np.asarray(res["predictions"]["S3"].X)
    np.testing.assert_allclose(got, pipe.predict(pooled["S3"]), rtol=1e-3, atol=1e-4)
    assert res["config"]["model"]["context_radius_um"] == radius


def test_a_context_model_is_not_run_without_its_neighbourhood(synthetic, tmp_path, capsys):
    """Trained with --context-radius: the checkpoint records it; the single-patch
    encoder (export, evaluate --ckpt; infer pools, see test_region_infer) refuses it in
    one line, and training
    without a frozen encoder refuses the option."""
    from mclx.checkpoint import load_checkpoint

    ck = tmp_path / "m.pt"
    opts = tiny_options(synthetic, model="ridge")
    res = run_cli(capsys, ["train", "--data", synthetic, *opts, "--sections", "S1,S2",
                           "--context-radius", "300", "-q", "--out", ck])  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(ck).model_cfg.context_radius_um == 300.0
    out = tmp_path / "s.json"
    res = run_cli(capsys, ["evaluate", "--data", synthetic, "--ckpt", ck, "--sections", "S3",
                           "--out", out])  # fmt: skip
    assert_one_line_error(res, "--context-radius 300", "cannot run")
    assert not out.exists()
    opts = tiny_options(synthetic, frozen=False)
    res = run_cli(capsys, ["train", "--data", synthetic, *opts, "--context-radius", "300",
                           "-q", "--out", tmp_path / "n.pt"])  # fmt: skip
    assert_one_line_error(res, "--freeze-encoder")
