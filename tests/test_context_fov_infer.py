"""The wider field of view at inference and export (``--context-fov``, issue #28).

A ``--context-fov`` model reads each patch and a second, wider crop around it; the
checkpoint's ``PreprocessCfg.views_um`` names it, every reader cuts it (the whole-slide
runtime, ``mclx evaluate --ckpt``, export calibration) and stacks it after the patch on
the channel axis (N x H x W x 6), and every model's forward runs both views through its
encoder (:func:`mclx.models.backbones.encode`). Checked here: the pieces against plain
loops (the view split, the per-view pixel scaling, the reader's crops), then ridge
models trained for a moment on real her2st sections predicting C2 at its spots through
``mclx infer`` as the head does on features of independently cut crops joined in
float64 (a wide field alone; with a 400 µm neighbourhood in concat mode, the region
step), and the exported ONNX graph (6 input channels) predicting what the checkpoint
does.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from helpers.cli import mclx
from helpers.data import c2_slide_and_spots

FOV, RADIUS = 600.0, 400.0
FP32 = ("--backend", "torch", "--precision", "fp32")  # not auto's choice, which may be bf16


def test_encode_runs_each_view_through_the_encoder_and_joins_them():
    from mclx.models.backbones import encode

    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten())  # fmt: skip
    x = torch.randn(4, 6, 16, 16)
    got = encode(conv, x)
    want = torch.cat([conv(x[:, :3]), conv(x[:, 3:])], dim=1)  # [own, wide]
    torch.testing.assert_close(got, want)
    assert encode(conv, x[:, :3]).shape == (4, 5)
    with pytest.raises(ValueError, match="4 channels"):
        encode(conv, x[:, :4])


def test_pixel_scale_applies_to_every_view():
    from mclx.config import PreprocessCfg
    from mclx.inference.transform import to_model_input

    pre = PreprocessCfg(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    batch = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 6), dtype=np.uint8)
    want = np.empty((2, 6, 8, 8))
    for c in range(6):  # float64, channel by channel
        want[:, c] = (batch[..., c] / 255.0 - pre.mean[c % 3]) / pre.std[c % 3]
    np.testing.assert_allclose(to_model_input(batch, pre), want, rtol=1e-5, atol=1e-6)
    got = to_model_input(torch.from_numpy(batch), pre).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reader_stacks_the_wider_crop_after_the_tile():
    from mclx.data.slide import open_slide
    from mclx.wsi.prefetch import prefetch
    from mclx.wsi.tiling import Tiles

    img = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    path = _png(img)
    slide = open_slide(path, mpp=1.0)
    tiles = Tiles(np.array([[50.5, 60.2], [390.0, 10.0]]), ["a", "b"], size=40, views=(120,))
    assert tiles.crops(0) == [(30, 40, 40), (-10, 0, 120)]
    ((batch, _, _),) = list(prefetch(slide, tiles, out=32, batch_size=2, workers=1))
    assert batch.shape == (2, 32, 32, 6)
    for i in range(2):
        own = slide.read(*tiles.origin(i), 40, 32)
        wide = slide.read(*tiles.origin(i, 120), 120, 32)
        np.testing.assert_array_equal(batch[i, ..., :3], own)
        np.testing.assert_array_equal(batch[i, ..., 3:], wide)
    assert not np.array_equal(batch[0, ..., :3], batch[0, ..., 3:])


def _png(img: np.ndarray):
    import tempfile
    from pathlib import Path

    from PIL import Image

    path = Path(tempfile.mkdtemp()) / "tissue.png"
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="module")
def fov_models(her2st, tmp_path_factory):
    """ridge with a 600 µm field of view, and with it a 400 µm neighbourhood in concat
    mode (C3, C4; 20 genes; a frozen ``tiny_cnn`` without pretrained weights); the
    first exported to ONNX (FP32, the parity gate on her2st spots)."""
    d = tmp_path_factory.mktemp("fov")
    genes = d / "genes.txt"
    genes.write_text("\n".join(map(str, np.load(her2st / "her_hvg_cut_1000.npy")[:20])))
    common = ["--data", her2st, "--encoder", "tiny_cnn", "--encoder-weights", "none",
              "--genes", genes, "--freeze-encoder", "-q", "--model", "ridge",
              "--sections", "C3,C4", "--context-fov", str(FOV)]  # fmt: skip
    runs = {"fov": [], "concat": ["--context-radius", str(RADIUS), "--context-mode", "concat"]}
    for name, args in runs.items():
        res = mclx("train", *common, *args, "--out", d / f"{name}.pt")
        assert res.returncode == 0, res.stderr
    res = mclx("export", "--ckpt", d / "fov.pt", "--calib-data", her2st, "-q")
    assert res.returncode == 0, res.stderr
    return d


def _infer(model, slide, out, *extra):
    res = mclx("infer", slide, "--model", model, "--out", out, "-q", *extra)
    assert res.returncode == 0, res.stderr
    assert not res.stderr.strip(), res.stderr
    return ad.read_h5ad(out)


def _views_f64(ck, c2):
    """C2's own and wide features, each view cut by the training cutter and encoded on
    its own, as float64."""
    from mclx.data.patches import section_patches
    from mclx.inference.embed import encode_features

    pre = ck.preprocess
    own = section_patches(c2, pre.patch_size, pre.mpp)
    wide = section_patches(c2, pre.patch_size, pre.mpp, FOV)
    enc = ck.model.image_encoder
    cpu = torch.device("cpu")
    return [encode_features(enc, p, pre, device=cpu).astype(np.float64) for p in (own, wide)]


def _others_f64(f: np.ndarray, xy_um: np.ndarray, radius: float) -> np.ndarray:
    """Each spot's weighted mean over the OTHER spots within ``radius`` (itself when it
    has none), weights ``exp(-2 (d / R)^2)``: a plain loop."""
    out = np.empty_like(f)
    for i in range(len(f)):
        d = np.sqrt(((xy_um - xy_um[i]) ** 2).sum(axis=1))
        w = np.where(d <= radius, np.exp(-2.0 * (d / radius) ** 2), 0.0)
        w[i] = 0.0
        out[i] = (w[:, None] * f).sum(axis=0) / w.sum() if w.sum() else f[i]
    return out


@pytest.mark.parametrize("name", ["fov", "concat"])
def test_infer_reads_the_wide_field_as_training_cut_it(name, fov_models, her2st, tmp_path):
    from mclx.checkpoint import load_checkpoint
    from mclx.data.her2st import read_section

    slide, spots = c2_slide_and_spots(her2st)
    pred = _infer(fov_models / f"{name}.pt", slide, tmp_path / "c2.h5ad", "--spots", spots,
                  *FP32)  # fmt: skip
    c2 = read_section(her2st, "C2")
    c2 = c2[["C2_" + i for i in pred.obs_names]].copy()
    ck = load_checkpoint(fov_models / f"{name}.pt")
    assert ck.preprocess.views_um == (FOV,)
    side = pred.uns["mclx"]["view_sizes_level0"]  # the wide crop's side at C2's µm/px
    assert list(side) == [round(FOV / pred.uns["mclx"]["slide_mpp"])]
    own, wide = _views_f64(ck, c2)
    parts = [own, wide]
    if name == "concat":
        xy_um = np.asarray(c2.obsm["spatial"], np.float64) * float(c2.uns["mpp"])
        parts.append(_others_f64(own, xy_um, RADIUS))
    head = ck.model.double().eval()
    with torch.no_grad():
        want = head.embed_image_features(torch.from_numpy(np.concatenate(parts, 1))).numpy()
        parts[1] = own  # the patch where the wide crop should be: must not pass
        blind = head.embed_image_features(torch.from_numpy(np.concatenate(parts, 1))).numpy()
    np.testing.assert_allclose(pred.X, want, rtol=1e-4, atol=1e-4)
    assert np.abs(blind - want).max() > 100 * np.abs(pred.X - want).max()


def test_exported_graph_takes_both_views(fov_models, her2st, tmp_path):
    import onnx

    slide, spots = c2_slide_and_spots(her2st)
    path = fov_models / "fov.onnx"
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 6  # the patch's RGB, then the wide field's
    a = _infer(fov_models / "fov.pt", slide, tmp_path / "a.h5ad", "--spots", spots, *FP32)
    b = _infer(path, slide, tmp_path / "b.h5ad", "--spots", spots, "--precision", "fp32")
    assert b.uns["mclx"]["backend"] == "onnxruntime"
    np.testing.assert_allclose(b.X, a.X, rtol=1e-4, atol=1e-4)
