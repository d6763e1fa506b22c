"""Region models in ``mclx infer`` (:mod:`mclx.wsi.region`): a section model (his2st)
and a context-radius model (ridge, ``--context-radius 400``), each trained for a moment
on real her2st sections, predict C2 at its spots as the model itself does: his2st as
its own section forward on the same patches and array coordinates (the evaluate path),
ridge on features pooled by an independent float64 loop over the spots' µm positions
(and not as it would without pooling). Then the one-line refusals."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from helpers.cli import assert_one_line_error, mclx, run_cli
from helpers.data import c2_slide_and_spots

RADIUS = 400.0


@pytest.fixture(scope="module")
def region_models(her2st, tmp_path_factory):
    """his2st (tiny, 1 epoch on C3), the same with a 400 µm context, and ridge with a
    400 µm context (C3, C4): 20 genes of the HER2+ panel, a frozen ``tiny_cnn`` encoder
    without pretrained weights."""
    d = tmp_path_factory.mktemp("region")
    genes = d / "genes.txt"
    genes.write_text("\n".join(map(str, np.load(her2st / "her_hvg_cut_1000.npy")[:20])))
    common = ["--data", her2st, "--encoder", "tiny_cnn", "--encoder-weights", "none",
              "--genes", genes, "--freeze-encoder", "-q"]  # fmt: skip
    his2st = ["--model", "his2st", "--sections", "C3", "--epochs", "1", "--embed-dim", "16",
              "--depth", "1", "--heads", "2"]  # fmt: skip
    context = ["--context-radius", str(RADIUS)]
    runs = {
        "his2st": his2st,
        "his2st_context": [*his2st, *context],
        "ridge": ["--model", "ridge", "--sections", "C3,C4", *context],
    }
    for name, args in runs.items():
        res = mclx("train", *common, *args, "--out", d / f"{name}.pt")
        assert res.returncode == 0, res.stderr
    return d


def _infer(model, slide, out, *extra):
    res = mclx("infer", slide, "--model", model, "--out", out, "-q", *extra)
    assert res.returncode == 0, res.stderr
    assert not res.stderr.strip(), res.stderr  # notes on stdout, nothing on stderr
    return ad.read_h5ad(out)


def _section(her2st):
    from mclx.data.her2st import read_section

    return read_section(her2st, "C2")


def test_section_model_predicts_the_section_as_its_own_forward(region_models, her2st, tmp_path):
    from mclx.checkpoint import load_checkpoint
    from mclx.data.dataset import build_table
    from mclx.data.patches import section_patches
    from mclx.inference import predict
    from mclx.inference.encoders import TorchEncoder

    slide, spots = c2_slide_and_spots(her2st)
    pred = _infer(region_models / "his2st.pt", slide, tmp_path / "c2.h5ad", "--spots", spots)
    assert pred.uns["mclx"]["backend"] == "torch" and "region" in pred.uns["mclx"]["timings"]
    c2 = _section(her2st)
    assert sorted(pred.obs_names) == sorted(i.removeprefix("C2_") for i in c2.obs_names)
    # the spot file's order, as infer reads it: the spot graph breaks distance ties by
    # order, so the counts file's order (read_section's) may predict otherwise
    c2 = c2[["C2_" + i for i in pred.obs_names]].copy()
    ck = load_checkpoint(region_models / "his2st.pt")
    patches = section_patches(c2, ck.preprocess.patch_size, ck.preprocess.mpp)
    pos = build_table({"C2": c2}, ck.preprocess).pos  # what mclx evaluate --ckpt passes
    want = predict(TorchEncoder(ck), patches, positions=pos)
    np.testing.assert_allclose(pred.X, want, rtol=1e-4, atol=1e-5)
    # the whole section matters: one spot alone is predicted otherwise
    alone = predict(TorchEncoder(ck), patches[:1], positions=pos[:1])
    assert np.abs(alone[0] - want[0]).max() > 1e-3


def _pooled_f64(features: np.ndarray, xy_um: np.ndarray, radius: float) -> np.ndarray:
    """Each spot's features as the weighted mean over the spots within ``radius`` µm,
    weights ``exp(-2 (d / R)^2)``: a plain loop, independent of mclx's sparse matrix."""
    f = np.asarray(features, np.float64)
    out = np.empty_like(f)
    for i in range(len(f)):
        d = np.sqrt(((xy_um - xy_um[i]) ** 2).sum(axis=1))
        w = np.where(d <= radius, np.exp(-2.0 * (d / radius) ** 2), 0.0)
        out[i] = (w[:, None] * f).sum(axis=0) / w.sum()
    return out


@pytest.mark.parametrize("name", ["ridge", "his2st_context"])
def test_context_model_pools_the_tiles_neighbourhoods(name, region_models, her2st, tmp_path):
    import torch

    from mclx.checkpoint import load_checkpoint
    from mclx.data.dataset import build_table
    from mclx.data.patches import section_patches
    from mclx.inference.embed import encode_features

    slide, spots = c2_slide_and_spots(her2st)
    pred = _infer(region_models / f"{name}.pt", slide, tmp_path / "c2.h5ad", "--spots", spots)
    c2 = _section(her2st)
    c2 = c2[["C2_" + i for i in pred.obs_names]].copy()  # infer's order (his2st's graph)
    mpp = float(c2.uns["mpp"])  # the training reader's µm/px of C2
    assert pred.uns["mclx"]["slide_mpp"] == pytest.approx(mpp, rel=1e-9)
    ck = load_checkpoint(region_models / f"{name}.pt")
    assert ck.model_cfg.context_radius_um == RADIUS
    patches = section_patches(c2, ck.preprocess.patch_size, ck.preprocess.mpp)
    feats = encode_features(
        ck.model.image_encoder, patches, ck.preprocess, device=torch.device("cpu")
    )
    xy_um = np.asarray(c2.obsm["spatial"], np.float64) * mpp  # spot centres, level-0 px
    pos = build_table({"C2": c2}, ck.preprocess).pos  # a section model's array coordinates
    args = (torch.from_numpy(pos),) if ck.model.kind == "section" else ()
    head = ck.model.double().eval()
    with torch.no_grad():
        pooled = torch.from_numpy(_pooled_f64(feats, xy_um, RADIUS))
        want = head.embed_image_features(pooled, *args).numpy()
        alone = head.embed_image_features(torch.from_numpy(feats.astype(np.float64)), *args)
    np.testing.assert_allclose(pred.X, want, rtol=1e-5, atol=1e-5)
    # without pooling the test would fail (the tiny his2st barely reads its features:
    # 1e-3 apart, where float32 against float64 is 3e-7)
    err, off = np.abs(pred.X - want).max(), np.abs(alone.numpy() - want).max()
    assert not np.allclose(alone.numpy(), want, rtol=1e-5, atol=1e-5) and off > 100 * err


def test_region_model_refusals_are_one_line(region_models, her2st, tmp_path, capsys):
    import pandas as pd

    slide, spots = c2_slide_and_spots(her2st)
    his2st = region_models / "his2st.pt"
    out = tmp_path / "x.h5ad"
    far = tmp_path / "C2_far_selection.tsv"  # array coordinates beyond the tables
    table = pd.read_csv(spots, sep="\t")
    table.assign(x=table["x"] + 100).to_csv(far, sep="\t", index=False)
    xy = tmp_path / "xy.csv"  # spots without array coordinates
    table[["pixel_x", "pixel_y"]].set_axis(["x", "y"], axis=1).to_csv(xy, index=False)
    cases = [
        (["--spots", far], [str(far), "positional tables", "his2st"]),
        (["--spots", xy, "--mpp", "0.69"], [str(xy), "no spot array coordinates"]),
        (["--mpp", "0.7"], [str(his2st), "needs spot array coordinates: pass --spots FILE"]),
        (["--spots", spots, "--backend", "onnxruntime"], [str(his2st), "--backend torch"]),
        (["--spots", spots, "--resume"], ["no saved run to resume", "predicts every tile"]),
    ]
    for extra, needles in cases:
        res = run_cli(capsys, ["infer", slide, "--model", his2st, "--out", out, "-q", *extra])
        assert_one_line_error(res, *needles)
        assert not out.exists() and not list(tmp_path.glob("x.h5ad*"))
    res = run_cli(capsys, ["export", "--ckpt", his2st, "-q"])  # the section model's ONNX
    assert res.returncode == 0, res.stderr
    onnx = his2st.with_suffix(".onnx")
    res = run_cli(capsys, ["infer", slide, "--model", onnx, "--spots", spots, "--out", out, "-q"])
    assert_one_line_error(res, str(onnx), f"pass --model {his2st.resolve()}")
    assert not out.exists()
