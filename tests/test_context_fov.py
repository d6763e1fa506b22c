"""The wider field of view (``--context-fov``, issue #28): the crop handed to the encoder
covers the asked µm on two scans of one tissue at different µm/px (a marker only the
wide crop holds, zeros beyond the image's border), is resized to the patch size, and
its features follow the spot's own (``[own, wide]``) against an independent mean over
the tissue; the wide features are their own entry of the feature cache; every model's
heads size from the joined width; a CLI run on real sections; refusals in one line."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, needs, run_cli, tiny_options
from PIL import Image
from torch import nn

from mclx.config import PreprocessCfg
from mclx.training.context import section_features
from mclx.training.features import PatchCache

# the tissue, drawn at 1 µm per pixel: grey, with a red 40 µm marker 200 µm right of spot 0
TISSUE_UM = (1000, 1200)  # height, width
SPOTS_UM = np.array([[600.0, 500.0], [150.0, 500.0]])  # spot 1: 150 µm from the left edge
MARKER_UM = (480, 520, 780, 820)  # y0, y1, x0, x1
OWN_UM, WIDE_UM = 224.0, 672.0  # the patch: 224 px at 1 µm/px; the wide crop 3x that


def _tissue() -> np.ndarray:
    t = np.full((*TISSUE_UM, 3), 100, np.uint8)
    t[:, :300] = (40, 160, 90)  # a green band on the left: spot 1's wide crop sees it
    y0, y1, x0, x1 = MARKER_UM
    t[y0:y1, x0:x1] = (255, 0, 0)
    return t


def _section(tmp_path, mpp: float) -> SimpleNamespace:
    """The tissue scanned at ``mpp`` µm/px (0.5: every µm pixel repeated 2 x 2)."""
    rep = round(1 / mpp)
    img = _tissue().repeat(rep, axis=0).repeat(rep, axis=1)
    path = tmp_path / f"tissue_{mpp}.png"
    Image.fromarray(img).save(path)
    uns = {"mpp": mpp, "image_path": str(path), "section": f"T{mpp}"}
    return SimpleNamespace(uns=uns, obsm={"spatial": SPOTS_UM / mpp})


def _window_mean(center_um: np.ndarray, side_um: float) -> np.ndarray:
    """Mean colour in [0, 1] of the tissue square of ``side_um`` around the centre,
    zeros outside the tissue: float64, from the 1 µm raster (no resampling)."""
    t = _tissue().astype(np.float64) / 255
    half = side_um / 2
    x0, y0 = (np.floor(center_um) - half).astype(int)
    side = int(side_um)
    out = np.zeros((side, side, 3))
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, TISSUE_UM[1]), min(y0 + side, TISSUE_UM[0])
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = t[sy0:sy1, sx0:sx1]
    return out.mean(axis=(0, 1))


class MeanColour(nn.Module):
    """A stub encoder: the mean colour of its input (N, 3, H, W) -> (N, 3); it keeps
    every batch it was handed."""

    num_features = 3

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.ones(1))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x.mean(dim=(2, 3))


def _model(fov_um: float, radius: float = 0.0, mode: str = "mean"):
    cfg = SimpleNamespace(context_fov_um=fov_um, context_radius_um=radius, context_mode=mode)
    return SimpleNamespace(cfg=cfg, image_encoder=MeanColour())


@pytest.mark.parametrize("mpp", [0.5, 1.0])
def test_the_wide_crop_covers_the_asked_um_at_any_scale(tmp_path, mpp):
    """At 0.5 and 1 µm/px, the encoder gets 224 px crops: the spot's own (224 µm) without
    the marker, the wide one (672 µm, 3 µm per crop pixel) with it where the tissue puts
    it, zeros where it crosses the image's border; features [own, wide] are the mean
    colours of the two windows of the tissue."""
    a = _section(tmp_path, mpp)
    pre = PreprocessCfg(patch_size=224, mpp=1.0)
    cache, model = PatchCache({"T": a}, 224), _model(WIDE_UM)
    feats = section_features(cache, model, "T", pre, progress=False)
    own, wide = model.image_encoder.seen  # one batch each: the own crops, the wide ones
    assert own.shape == wide.shape == (2, 3, 224, 224)

    def red(x):  # (..., 3, H, W) -> (..., H, W)
        return (x[..., 0, :, :] > 0.9) & (x[..., 1, :, :] < 0.1) & (x[..., 2, :, :] < 0.1)

    assert not red(own).any()
    # marker: x 780-820 µm, y 480-520 µm; crop pixel = 112 + (µm - centre) / 3
    marker = red(wide[0]).nonzero().numpy()
    assert 150 < len(marker) < 220  # ~ (40 / 3)^2
    np.testing.assert_allclose(marker.mean(axis=0), [112 + 0 / 3, 112 + 200 / 3], atol=1.5)
    assert not red(wide[1]).any()
    # spot 1 at x = 150 µm: its wide crop starts 186 µm (62 crop px) left of the image
    assert (wide[1][:, :, :60] == 0).all() and (wide[1][:, :, 66:] > 0).all()
    assert feats.shape == (2, 6)
    for i, c in enumerate(SPOTS_UM):
        np.testing.assert_allclose(feats[i, :3], _window_mean(c, OWN_UM), atol=2e-3)
        np.testing.assert_allclose(feats[i, 3:], _window_mean(c, WIDE_UM), atol=1e-2)
    assert np.abs(feats[:, 3:] - feats[:, :3]).max() > 0.05  # the wide crop sees more


def test_a_fov_without_the_sections_scale_is_refused(tmp_path):
    from mclx.errors import DataError

    a = _section(tmp_path, 1.0)
    a.uns["mpp"] = None
    cache = PatchCache({"T": a}, 224)
    with pytest.raises(DataError, match="field of view of 672 µm has no scale"):
        section_features(cache, _model(WIDE_UM), "T", PreprocessCfg(patch_size=224))


@pytest.mark.parametrize("name", ["mclstexp", "bleep", "stnet", "ridge", "histogene", "his2st"])
def test_heads_size_from_the_joined_width(name):
    """[own, wide, neighbourhood] of a 64-wide encoder: every model's head reads 192."""
    from mclx.inference.embed import head_outputs
    from mclx.models import create_model, model_cfg

    extra = {"depth": 1, "heads": 2, "dim_head": 8, "embed_dim": 32} if "his" in name else {}
    cfg = model_cfg(name, encoder="tiny_cnn", n_genes=5, **extra, context_fov_um=600.0,
                    context_radius_um=300.0, context_mode="concat")  # fmt: skip
    model = create_model(cfg).eval()
    feats = np.random.default_rng(0).normal(size=(6, 3 * 64)).astype(np.float32)
    pos = np.array([[i % 3, i // 3] for i in range(6)])
    out = head_outputs(model, feats, positions=pos, device=torch.device("cpu"))
    assert len(out) == 6
    with pytest.raises(RuntimeError):  # the encoder's own width no longer fits
        head_outputs(model, feats[:, :64], positions=pos, device=torch.device("cpu"))


def test_pixel_section_models_refuse_joined_features():
    from mclx.models import create_model, model_cfg

    cfg = model_cfg("his2st", n_genes=5, context_fov_um=600.0)  # patch112: pixels
    with pytest.raises(ValueError, match="need a feature encoder"):
        create_model(cfg)


def test_wide_features_are_their_own_cache_entry(synthetic, tmp_path, monkeypatch, capsys):
    """Training with --context-fov encodes each section twice (own, wide) into four
    entries; a plain run then reads the own ones; another field encodes only its own."""
    from mclx.inference import embed

    monkeypatch.setenv("MCLX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MCLX_FEATURE_CACHE", "1")
    calls: list[str] = []
    real = embed.encode_features
    monkeypatch.setattr(
        embed, "encode_features", lambda *a, **kw: calls.append(kw["desc"]) or real(*a, **kw)
    )
    opts = tiny_options(synthetic, model="knn")
    train = ["train", "--data", synthetic, "--sections", "S1,S2", *opts, "-q"]

    def run(name, *extra):
        res = run_cli(capsys, [*train, *extra, "--out", tmp_path / name])
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert "2 sections encoded" in run("a.pt", "--context-fov", "600")
    assert sorted(calls) == ["encode S1", "encode S1 (600 µm field)", "encode S2",
                             "encode S2 (600 µm field)"]  # fmt: skip
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 4
    calls.clear()
    assert "2 sections from cache" in run("b.pt")
    assert "2 sections from cache" in run("c.pt", "--context-fov", "600")
    assert calls == []
    run("d.pt", "--context-fov", "900")
    assert sorted(calls) == ["encode S1 (900 µm field)", "encode S2 (900 µm field)"]


def test_joined_models_are_refused_where_not_applied(synthetic, tmp_path, capsys):
    """The checkpoint records the options; evaluate --ckpt and export refuse the
    neighbourhood in one line naming it (a wider field of view alone runs there:
    tests/test_context_fov_infer.py); mclx infer runs the model (its region step); a
    trained encoder and concat without a radius are refused."""
    from mclx.checkpoint import load_checkpoint

    ck = tmp_path / "m.pt"
    opts = tiny_options(synthetic, model="ridge")
    res = run_cli(capsys, ["train", "--data", synthetic, *opts, "--sections", "S1,S2",
                           "--context-fov", "600", "--context-radius", "300",
                           "--context-mode", "concat", "-q", "--out", ck])  # fmt: skip
    assert res.returncode == 0, res.stderr
    cfg = load_checkpoint(ck).model_cfg
    assert (cfg.context_fov_um, cfg.context_mode) == (600.0, "concat")
    want = "--context-radius 300 --context-mode concat;"
    res = run_cli(capsys, ["evaluate", "--data", synthetic, "--ckpt", ck, "--sections", "S3",
                           "--out", tmp_path / "s.json"])  # fmt: skip
    assert_one_line_error(res, want, "cannot run")
    res = run_cli(capsys, ["export", "--ckpt", ck, "-q"])
    assert_one_line_error(res, want, "cannot run")
    # mclx infer cuts the wide crop and joins the neighbourhood (mclx.wsi.region)
    image = synthetic / "data" / "ST-imgs" / "S" / "S3" / "S3.jpg"
    spots = synthetic / "data" / "ST-spotfiles" / "S3_selection.tsv"
    out = tmp_path / "s3.h5ad"
    res = run_cli(capsys, ["infer", image, "--model", ck, "--spots", spots, "-q", "--out", out])
    assert res.returncode == 0, res.stderr
    assert out.is_file()
    frozen = tiny_options(synthetic, frozen=False)
    res = run_cli(capsys, ["train", "--data", synthetic, *frozen, "--context-fov", "600",
                           "-q", "--out", tmp_path / "n.pt"])  # fmt: skip
    assert_one_line_error(res, "--context-fov 600", "--freeze-encoder")
    res = run_cli(capsys, ["train", "--data", synthetic, *opts, "--context-mode", "concat",
                           "-q", "--out", tmp_path / "c.pt"])  # fmt: skip
    assert_one_line_error(res, "--context-mode concat", "give a radius")


@needs("her2st")
def test_evaluate_with_a_wide_field_on_real_sections(her2st, tmp_path, capsys):
    """knn on C2 and C3 with --context-fov (3x the patch's field): each fold's bank and
    queries read [own, wide] features; the result records the field."""
    import json

    out = tmp_path / "r.json"
    opts = tiny_options(her2st, model="knn", genes_file=None)
    res = run_cli(capsys, ["evaluate", "--data", her2st, "--sections", "C2,C3", *opts,
                           "--n-hvg", "50", "--fov-um", "180", "--context-fov", "540",
                           "--k", "20", "-q", "--out", out])  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(out.read_text())
    assert got["config"]["model"]["context_fov_um"] == 540.0
    assert set(got["sections"]) == {"C2", "C3"}
    assert np.isfinite(got["mean"]["pcc_acg"])
