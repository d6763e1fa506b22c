"""`mclx infer` end to end: equivalence with evaluation, OpenSlide TIFFs (bad inputs:
test_bad_inputs.py)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from helpers import assert_one_line_error, mclx

from mclx.bank import build_bank, load_bank, save_bank
from mclx.checkpoint import load_checkpoint
from mclx.data.her2st import find_data_root, read_section
from mclx.evaluate import predict_section


@pytest.fixture(scope="module")
def synth_model(synthetic, tmp_path_factory):
    """A tiny checkpoint and bank trained on the synthetic data (fast)."""
    d = tmp_path_factory.mktemp("synth_model")
    res = mclx(
        "train",
        "--data",
        synthetic,
        "--sections",
        "S1,S2",
        "--encoder",
        "tiny_cnn",
        "--encoder-weights",
        "none",
        "--genes",
        synthetic / "genes.txt",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--freeze-encoder",
        "-q",
        "--out",
        d / "m.pt",
    )
    assert res.returncode == 0, res.stderr
    save_bank(build_bank(d / "m.pt", synthetic, sections=["S1", "S2", "S4"]), d / "bank.npz")
    return d / "m.pt", d / "bank.npz"


@pytest.mark.data
@pytest.mark.slow
def test_infer_at_spots_matches_evaluation_path(her2st, tmp_path):
    root = find_data_root(her2st)
    ck = tmp_path / "c3.pt"
    res = mclx(
        "train",
        "--data",
        her2st,
        "--sections",
        "C3",
        "--freeze-encoder",
        "--epochs",
        "2",
        "--encoder-weights",
        "none",
        "-q",
        "--out",
        ck,
    )
    assert res.returncode == 0, res.stderr
    bank = save_bank(build_bank(ck, her2st, sections=["C3", "C4", "A1"]), tmp_path / "b.npz")
    c2 = read_section(her2st, "C2")
    out = tmp_path / "c2.h5ad"
    res = mclx(
        "infer",
        c2.uns["image_path"],
        "--bank",
        bank,
        "--model",
        ck,
        "--backend",
        "torch",
        "--precision",
        "fp32",
        "--spots",
        root / "ST-spotfiles" / "C2_selection.tsv",
        "--out",
        out,
        "-q",
    )
    assert res.returncode == 0, res.stderr
    pred = ad.read_h5ad(out)  # rows in spot-file order; align to the reader's order
    assert sorted(pred.obs_names) == sorted(i.removeprefix("C2_") for i in c2.obs_names)
    pred = pred[[i.removeprefix("C2_") for i in c2.obs_names]]
    expected = predict_section(load_checkpoint(ck), load_bank(bank), c2)
    np.testing.assert_allclose(pred.X, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.obsm["spatial"], c2.obsm["spatial"])
    u = pred.uns["mclx"]
    assert u["checkpoint_fingerprint"] == u["bank_fingerprint"] == load_bank(bank).fingerprint
    assert set(u["timings"]) >= {"read", "encode", "retrieve", "write"}
    assert u["tile_size_level0"] == 224  # within 2% of the training µm/px: no resampling


@pytest.mark.data
def test_pyramidal_tiff_through_openslide(her2st, synth_model, tmp_path):
    from PIL import Image

    from mclx.data.patches import load_image
    from mclx.slide import open_slide, write_pyramidal_tiff
    from mclx.tiling import tissue_mask

    ck, bank = synth_model
    img = load_image(read_section(her2st, "C3").uns["image_path"])[::2, ::2]
    tif = write_pyramidal_tiff(np.ascontiguousarray(img), tmp_path / "c3.tif", mpp=1.372)
    slide = open_slide(tif)
    assert slide.backend == "openslide" and slide.mpp == pytest.approx(1.372, rel=1e-3)
    out = tmp_path / "c3.h5ad"
    res = mclx(
        "infer", tif, "--bank", bank, "--out", out, "--plot", "GENE001", "--plot", "GENE002", "-q"
    )
    assert res.returncode == 0, res.stderr
    assert "tiles/s" in res.stdout
    pred = ad.read_h5ad(out)
    thumb, f = slide.thumbnail(2048)
    mask = tissue_mask(thumb)
    size = pred.uns["mclx"]["tile_size_level0"]
    half = size / 2 / f
    fracs = [
        mask[int(y - half) : int(y + half), int(x - half) : int(x + half)].mean()
        for x, y in pred.obsm["spatial"] / f
    ]
    assert min(fracs) >= 0.45  # every tile at least half tissue (grid_tiles' min_tissue)
    W, H = slide.dimensions
    assert 0 < pred.n_obs < 0.5 * (W // size) * (H // size)  # tissue tiles only
    assert size == round(224 * load_checkpoint(ck).preprocess.mpp / 1.372)
    for g in ("GENE001", "GENE002"):
        png = tmp_path / f"c3.{g}.png"
        assert png.is_file() and Image.open(png).size[0] > 400


def test_evaluate_a_trained_checkpoint_with_its_bank(synthetic, synth_model, tmp_path):
    import json

    ck, bank = synth_model
    out = tmp_path / "s3.json"
    res = mclx(
        "evaluate",
        "--data",
        synthetic,
        "--ckpt",
        ck,
        "--bank",
        bank,
        "--sections",
        "S3",
        "--k",
        "20",
        "--out",
        out,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert list(data["sections"]) == ["S3"] and data["config"]["k"] == 20
    expected = predict_section(
        load_checkpoint(ck), load_bank(bank), read_section(synthetic, "S3"), k=20
    )
    from mclx.data.dataset import build_table
    from mclx.metrics import score

    truth = build_table({"S3": read_section(synthetic, "S3")}, load_checkpoint(ck).preprocess)
    assert data["mean"]["pcc_acg"] == pytest.approx(score(expected, truth.expr)["pcc_acg"])
    leak = mclx(
        "evaluate",
        "--data",
        synthetic,
        "--ckpt",
        ck,
        "--bank",
        bank,
        "--sections",
        "S1",
        "--out",
        tmp_path / "leak.json",
    )
    assert_one_line_error(leak, "leakage")
