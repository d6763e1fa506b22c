"""`mclx infer` end to end: agreement with an independent computation, OpenSlide TIFFs
(bad inputs: test_bad_inputs.py).

The expected predictions are computed without mclx's inference layer
(:mod:`helpers.oracles`): patches cut with ``extract_patches`` (the default recipe's
wider field of view beside them as the training cutter resizes it: the resampling is
the slide reader's), the checkpoint's model run in float64 on pixels scaled by hand,
then cosine top-k and inverse-square-distance
weights in float64 numpy. mclx runs in float32, which moves a query's cosines by at
most ~6e-8 (measured: tiny CNN 4e-8, DenseNet-121 6e-8 on HER2+ patches): queries whose
k-th and (k+1)-th neighbours are closer than ``MARGIN`` (5x that) in cosine could swap
them and are left out (they must be few); the others must agree within ``RTOL`` /
``ATOL`` (log-expression values of order 1; measured differences ~1e-6, while one
wrong neighbour moves a prediction by ~1e-2).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_line_error, mclx, needs, train_tiny_cli
from helpers.oracles import image_outputs_f64, knn_predict, normalised_expression

from mclx.bank import build_bank, load_bank, save_bank
from mclx.checkpoint import load_checkpoint
from mclx.data.her2st import find_data_root, read_section
from mclx.data.patches import extract_patches, section_patches
from mclx.data.slide import load_image

MARGIN = 3e-7  # cosine gap at the k-th neighbour below which float32 may reorder
RTOL, ATOL = 1e-4, 1e-5


def expected_predictions(ck, bank, adata, *, k=None, mpp=None):
    """Independent float64 predictions for the spots of ``adata`` (see the module doc);
    ``mpp``: the µm/px the run cut the wide field on (default: the section's)."""
    pre = ck.preprocess
    if mpp is not None:
        adata = adata.copy()
        adata.uns["mpp"] = mpp
    patches = extract_patches(
        load_image(adata.uns["image_path"]), adata.obsm["spatial"], pre.patch_size
    )
    wide = [section_patches(adata, pre.patch_size, pre.mpp, w) for w in pre.views_um]
    patches = np.concatenate([patches, *wide], axis=-1)
    queries = image_outputs_f64(ck.model, patches, ck.preprocess)
    return knn_predict(
        queries,
        bank.embeddings,
        bank.expressions,
        k or bank.k,
        distance=bank.distance,
        weighting=bank.weighting,
    )


def assert_agrees(pred: np.ndarray, want, *, min_sure: float = 0.9) -> None:
    sure = want.sure(MARGIN)
    diff = np.abs(pred[sure] - want.pred[sure]).max()
    print(f"{(~sure).sum()} of {len(sure)} queries near-tied; max |difference| {diff:.2e}")
    assert sure.mean() >= min_sure, f"{(~sure).sum()} near-ties of {len(sure)}"
    np.testing.assert_allclose(pred[sure], want.pred[sure], rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def synth_model(synthetic, tmp_path_factory):
    """A tiny checkpoint and bank trained on the synthetic data (fast)."""
    d = tmp_path_factory.mktemp("synth_model")
    ck = train_tiny_cli(synthetic, d / "m.pt")
    save_bank(build_bank(ck, synthetic, sections=["S1", "S2", "S4"]), d / "bank.npz")
    return ck, d / "bank.npz"


@needs("her2st")
@pytest.mark.slow
def test_infer_at_spots_matches_an_independent_computation(her2st, tmp_path):
    root = find_data_root(her2st)
    # DenseNet-121 without weights, her2st's gene list, the default batch size
    ck = train_tiny_cli(
        her2st, tmp_path / "c3.pt", sections="C3", encoder="densenet121", epochs=2,
        batch_size=None,
    )  # fmt: skip
    bank = save_bank(build_bank(ck, her2st, sections=["C3", "C4", "A1"]), tmp_path / "b.npz")
    # every 4th spot of C2's spot file (47 of 187): the float64 DenseNet-121 of the
    # reference costs ~1 s a patch, and 47 queries still hold ~45 sure ones
    spots = pd.read_csv(root / "ST-spotfiles" / "C2_selection.tsv", sep="\t").iloc[::4]
    spots.to_csv(tmp_path / "C2_spots.tsv", sep="\t", index=False)
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
        tmp_path / "C2_spots.tsv",
        "--out",
        out,
        "-q",
    )
    assert res.returncode == 0, res.stderr
    pred = ad.read_h5ad(out)  # rows in spot-file order, named as the reader names them
    assert list(pred.obs_names) == [f"{x}x{y}" for x, y in zip(spots.x, spots.y, strict=True)]
    c2 = c2[[f"C2_{name}" for name in pred.obs_names]]
    # the slide's µm/px as the run found it (from the spots' array grid): the wide field's side
    mpp = pred.uns["mclx"]["slide_mpp"]
    assert_agrees(pred.X, expected_predictions(load_checkpoint(ck), load_bank(bank), c2, mpp=mpp))
    np.testing.assert_allclose(pred.obsm["spatial"], c2.obsm["spatial"])
    u = pred.uns["mclx"]
    assert u["checkpoint_fingerprint"] == u["bank_fingerprint"] == load_bank(bank).fingerprint
    assert set(u["timings"]) >= {"read", "encode", "retrieve", "write", "warmup", "compile"}
    assert u["tile_size_level0"] == 224  # within 2% of the training µm/px: no resampling


@needs("her2st")
def test_pyramidal_tiff_through_openslide(her2st, synth_model, tmp_path):
    from PIL import Image

    from mclx.data.slide import load_image, open_slide, write_pyramidal_tiff
    from mclx.wsi.tiling import tissue_mask

    ck, bank = synth_model
    img = load_image(read_section(her2st, "C3").uns["image_path"])[::2, ::2]
    tif = write_pyramidal_tiff(np.ascontiguousarray(img), tmp_path / "c3.tif", mpp=1.372)
    slide = open_slide(tif)
    assert slide.backend == "openslide" and slide.mpp == pytest.approx(1.372, rel=1e-3)
    out = tmp_path / "c3.h5ad"
    res = mclx(
        "infer", tif, "--bank", bank, "--out", out, "--plot", "GENE001", "--plot", "GENE002", "-q",
        "--reader-pool", "processes",
    )  # fmt: skip
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
    u = pred.uns["mclx"]
    assert (u["slide_vendor"], u["slide_mpp_source"]) == ("generic-tiff", "resolution tag")
    assert (u["tiles"], u["read_level"]) == (pred.n_obs, 0)  # tiles upsampled: level 0
    assert u["resample"] == pytest.approx(size / 224) and u["memory_estimate_bytes"] > 0
    assert (u["reader_pool"], u["readers"]) == ("processes", 2)
    for g in ("GENE001", "GENE002"):
        png = tmp_path / f"c3.{g}.png"
        assert png.is_file() and Image.open(png).size[0] > 400


def test_dicom_slide_given_as_its_folder(synth_model, tmp_path):
    """OpenSlide's DICOM test slide (16 x 16 px), opened through its folder, at a spot
    given in a CSV: the vendor and where the µm/px came from are in the predictions."""
    from helpers.data import ROOT

    fixtures = ROOT.parent / "shared" / "data" / "slide-fixtures"
    if not (fixtures / "boxes_0.dcm").is_file():
        pytest.skip(f"needs OpenSlide's test slides: not found at {fixtures}")
    ck, bank = synth_model
    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        (folder / name).write_bytes((fixtures / name).read_bytes())
    (tmp_path / "spots.csv").write_text("id,x,y\ncentre,8,8\n")
    out = tmp_path / "d.h5ad"
    args = ["infer", folder, "--bank", bank, "--spots", tmp_path / "spots.csv", "--out", out]
    res = mclx(*args, "-q")
    assert res.returncode == 0, res.stderr
    u = ad.read_h5ad(out).uns["mclx"]
    assert (u["slide_reader"], u["slide_vendor"]) == ("openslide", "dicom")
    assert (u["slide_mpp"], u["slide_mpp_source"]) == (pytest.approx(0.499), "dicom metadata")
    want = round(224 * load_checkpoint(ck).preprocess.mpp / 0.499)
    assert u["tile_size_level0"] == want


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
    from mclx.evaluation.metrics import score

    s3, loaded = read_section(synthetic, "S3"), load_checkpoint(ck)
    expected = expected_predictions(loaded, load_bank(bank), s3, k=20)
    assert expected.sure(MARGIN).all()  # no near-tie: the scores must agree closely
    pre = loaded.preprocess
    truth = normalised_expression(s3, pre.genes, pre.log_base)
    want = score(expected.pred, truth)
    for m in ("pcc_acg", "pcc_heg", "mse", "mae"):
        assert data["mean"][m] == pytest.approx(want[m], rel=1e-4, abs=1e-5), m
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
