"""The training-free baselines (``--model knn``, ``--model ridge``) through fit, bank,
export and cross-validation, each against an independent reference: scikit-learn's own
pipeline for the ridge probe (and its exported ONNX graph), a float64 brute-force k-NN
for knn."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_model
from helpers.cli import assert_one_line_error, run_cli

from mclx.inference.embed import encode_features

K = 20


@pytest.fixture(scope="module")
def ridge(synthetic):
    return tiny_model(synthetic, ["S1", "S2", "S3"], model="ridge")


def _features(tiny, section):
    from mclx.training.features import PatchCache

    return PatchCache(tiny.adatas, tiny.pre.patch_size).features(
        tiny.net.image_encoder, section, tiny.pre
    )


def test_ridge_alpha_is_chosen_by_section_folds(ridge):
    """The alpha kept is the one of lowest MSE over folds that each hold out whole
    training sections, PCA refitted inside every fold (computed here by hand)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge

    from mclx.models.baselines import ALPHAS

    x = np.concatenate([_features(ridge, s) for s in ridge.sections]).astype(np.float64)
    y, groups = ridge.table.expr.astype(np.float64), ridge.table.section.astype(str)
    n = ridge.net.cfg.embed_dim
    assert n == min(256, x.shape[1])  # tiny_cnn: 64 features
    mse = []
    for alpha in ALPHAS:
        errs = []
        for held in ridge.sections:
            tr, va = groups != held, groups == held
            pca = PCA(n, svd_solver="full").fit(x[tr])
            fit = Ridge(alpha=alpha).fit(pca.transform(x[tr]), y[tr])
            errs.append(np.mean((fit.predict(pca.transform(x[va])) - y[va]) ** 2))
        mse.append(np.mean(errs))
    assert float(ridge.net.alpha) == pytest.approx(ALPHAS[int(np.argmin(mse))])
    assert ridge.history == pytest.approx([min(mse)], rel=1e-6)


def test_ridge_module_matches_sklearn_and_its_onnx_export(ridge, tmp_path):
    """encoder -> PCA -> ridge in torch, and as one exported ONNX graph, predict what
    scikit-learn's fitted pipeline predicts from the same features."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline

    from mclx.checkpoint import load_checkpoint
    from mclx.export.exporter import export
    from mclx.inference import FORMATS
    from mclx.inference.encoders import OnnxRuntimeEncoder

    x = np.concatenate([_features(ridge, s) for s in ridge.sections]).astype(np.float64)
    ref = make_pipeline(
        PCA(ridge.net.cfg.embed_dim, svd_solver="full"), Ridge(alpha=float(ridge.net.alpha))
    ).fit(x, ridge.table.expr.astype(np.float64))
    ck = ridge.save(tmp_path / "ridge.pt")
    loaded = load_checkpoint(ck)
    assert loaded.model_cfg.name == "ridge" and loaded.model.kind == "regression"
    report = export(ck, n_patches=8, log=lambda *_: None)
    assert report["onnx"]["max_rel_err"] < 1e-4
    patches = np.random.default_rng(1).integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)
    feats = encode_features(loaded.model.image_encoder, patches, loaded.preprocess)
    expected = ref.predict(feats.astype(np.float64))
    onnx = OnnxRuntimeEncoder(FORMATS["onnx"].path(ck))(patches)
    assert onnx.shape == (6, len(ridge.pre.genes))
    np.testing.assert_allclose(onnx, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _brute_knn(q, bank, expr, k):
    """float64: cosine top-k, weights d(q, s)^-2 (L2 on raw vectors), normalised."""
    q, bank, expr = (np.asarray(a, np.float64) for a in (q, bank, expr))
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        bank / np.linalg.norm(bank, axis=1, keepdims=True)
    ).T
    top = np.argsort(-cos, axis=1)[:, :k]
    d2 = ((q[:, None, :] - bank[top]) ** 2).sum(-1)
    w = 1 / d2
    w /= w.sum(1, keepdims=True)
    return (w[..., None] * expr[top]).sum(1)


def test_knn_cli_bank_and_prediction_match_brute_force(synthetic, tmp_path, capsys):
    """``mclx train --model knn`` writes a checkpoint with nothing learnt; ``mclx bank
    build`` stores the raw pooled features of the bank spots; ``mclx evaluate --ckpt``
    predicts a held-out section as a float64 brute-force k-NN on those features does."""
    from mclx.bank import load_bank
    from mclx.checkpoint import load_checkpoint
    from mclx.data.dataset import build_table
    from mclx.data.her2st import read_her2st
    from mclx.data.patches import section_patches

    ck, bank_path, out = tmp_path / "knn.pt", tmp_path / "knn.npz", tmp_path / "s3.json"
    base = ["--data", synthetic, "--encoder", "tiny_cnn", "--encoder-weights", "none"]
    genes = ["--genes", synthetic / "genes.txt", "-q"]
    train = ["train", *base, *genes, "--model", "knn", "--sections", "S1,S2", "--out", ck]
    res = run_cli(capsys, train)
    assert res.returncode == 0, res.stderr
    build = ["bank", "build", "--ckpt", ck, "--data", synthetic, "--sections", "S1,S2"]
    res = run_cli(capsys, [*build, "--out", bank_path])
    assert res.returncode == 0, res.stderr
    loaded, bank = load_checkpoint(ck), load_bank(bank_path)
    assert loaded.model_cfg.k == 200 and bank.weighting == "inverse_square"
    assert bank.embeddings.shape == (len(bank), loaded.model.image_encoder.num_features)
    adatas = read_her2st(synthetic, ["S1", "S2", "S3"], with_image=True)
    pre = loaded.preprocess
    feats = {
        s: encode_features(loaded.model.image_encoder, section_patches(a, 224, pre.mpp), pre)
        for s, a in adatas.items()
    }
    np.testing.assert_allclose(bank.embeddings, np.concatenate([feats["S1"], feats["S2"]]))
    score = ["evaluate", "--data", synthetic, "--ckpt", ck, "--bank", bank_path]
    res = run_cli(capsys, [*score, "--sections", "S3", "--k", K, "--out", out])
    assert res.returncode == 0, res.stderr
    from mclx.inference import predict
    from mclx.inference.encoders import TorchEncoder

    patches = section_patches(adatas["S3"], 224, pre.mpp)
    pred = predict(TorchEncoder(loaded), patches, bank, k=K)
    expected = _brute_knn(feats["S3"], bank.embeddings, bank.expressions, K)
    np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-6)
    truth = build_table({"S3": adatas["S3"]}, pre).expr
    import json

    from mclx.evaluation.metrics import score as metrics

    assert json.loads(out.read_text())["sections"]["S3"]["pcc_acg"] == pytest.approx(
        metrics(expected, truth)["pcc_acg"], abs=1e-5
    )


@pytest.mark.parametrize("model", ["knn", "ridge"])
def test_cross_validation_rows(synthetic, model):
    """Leave-one-section-out runs both baselines end to end with finite scores; knn's
    folds refuse bank sections that have no image (it banks image features)."""
    from helpers import tiny_recipe

    from mclx.evaluation.evaluate import cross_validate

    recipe = tiny_recipe(synthetic, model=model, frozen=True)
    res = cross_validate(synthetic, recipe, k=K if model == "knn" else None, progress=False)
    assert sorted(res["sections"]) == ["S1", "S2", "S3"]
    assert all(np.isfinite(r["pcc_acg"]) and r["pcc_acg"] > 0 for r in res["sections"].values())
    if model == "ridge":  # each fold's own cross-validated choice is in its row
        from mclx.models.baselines import ALPHAS

        assert all(r["ridge_alpha"] in ALPHAS for r in res["sections"].values())
        assert all(r["pca_components"] >= 1 for r in res["sections"].values())
    if model == "knn":
        with pytest.raises(ValueError, match="image features"):
            cross_validate(synthetic, recipe, bank_sections=["S4"], k=K, progress=False)


def test_ridge_needs_two_training_sections(synthetic, tmp_path, capsys):
    args = ["train", "--data", synthetic, "--encoder", "tiny_cnn", "--encoder-weights", "none"]
    args += ["--genes", synthetic / "genes.txt", "--model", "ridge", "--sections", "S1"]
    res = run_cli(capsys, [*args, "-q", "--out", tmp_path / "r.pt"])
    assert_one_line_error(res, "at least two")
    assert not (tmp_path / "r.pt").exists()


def test_standardised_features_are_training_statistics_kept_by_the_checkpoint(synthetic, tmp_path):
    """``--standardize-features``: the buffers are the training spots' feature mean and
    std, the head sees standardised features, and a saved checkpoint predicts the same."""
    import torch

    from mclx.checkpoint import load_checkpoint

    tiny = tiny_model(synthetic, epochs=1, feature_norm=True)
    feats = np.concatenate([_features(tiny, s) for s in tiny.sections]).astype(np.float64)
    net = tiny.net
    np.testing.assert_allclose(net.feature_mean.numpy(), feats.mean(0), rtol=1e-5, atol=1e-6)
    std = np.where(feats.std(0) > 1e-12, feats.std(0), 1.0)  # dead ReLU features keep 1
    assert (std == 1.0).any()  # the random-init tiny_cnn has some: the rule is exercised
    np.testing.assert_allclose(net.feature_std.numpy(), std, rtol=1e-5, atol=1e-6)
    x = torch.as_tensor(feats[:5], dtype=torch.float32)
    with torch.no_grad():
        z = (x - torch.as_tensor(feats.mean(0))) / torch.as_tensor(std)
        expected = net.image_projection(z.float())
        torch.testing.assert_close(net.embed_image_features(x), expected, rtol=1e-4, atol=1e-5)
        loaded = load_checkpoint(tiny.save(tmp_path / "norm.pt")).model
        torch.testing.assert_close(loaded.embed_image_features(x), expected, rtol=1e-4, atol=1e-5)


def test_ridge_infers_a_slide_without_a_bank(ridge, synthetic, tmp_path, capsys):
    """``mclx infer --model ridge.pt`` (no bank) at the spots of S3 predicts what the
    model predicts from those spots' patches; a retrieval model without a bank is one
    error line."""
    import anndata as ad

    from mclx.checkpoint import load_checkpoint
    from mclx.data.her2st import read_her2st
    from mclx.data.patches import section_patches
    from mclx.inference import predict
    from mclx.inference.encoders import TorchEncoder

    ck = ridge.save(tmp_path / "ridge.pt")
    image = synthetic / "data" / "ST-imgs" / "S" / "S3" / "S3.jpg"
    spots = synthetic / "data" / "ST-spotfiles" / "S3_selection.tsv"
    out = tmp_path / "s3.h5ad"
    res = run_cli(capsys, ["infer", image, "--model", ck, "--spots", spots, "-q", "--out", out])
    assert res.returncode == 0, res.stderr
    got = ad.read_h5ad(out)
    loaded = load_checkpoint(ck)
    adata = read_her2st(synthetic, ["S3"], with_image=True)["S3"]
    patches = section_patches(adata, 224, loaded.preprocess.mpp)
    expected = predict(TorchEncoder(loaded), patches)
    assert list(got.var_names) == list(ridge.pre.genes) and got.n_obs == len(expected)
    np.testing.assert_allclose(np.sort(got.X, 0), np.sort(expected, 0), rtol=1e-4, atol=1e-4)
    knn = tiny_model(synthetic, model="knn", train=False).save(tmp_path / "knn.pt")
    res = run_cli(capsys, ["infer", image, "--model", knn, "--spots", spots, "--out", out])
    assert_one_line_error(res, "knn.pt", "pass --bank")
