"""``mclx view`` without a browser: the folder it writes (Deep Zoom pyramid, page data
equal to the predictions, OpenSeadragon beside it), plain images through OpenSlide's
ImageSlide, and its refusals (one line, nothing written, nothing replaced that it did
not write). The page itself, in Chromium: test_view_browser.py."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import xml.etree.ElementTree as ET

import anndata as ad
import numpy as np
import pytest
from helpers import assert_one_line_error, mclx, needs, run_cli
from PIL import Image

from mclx.data.slide import open_slide

pytestmark = needs("openseadragon")


def page_data(folder) -> dict:
    text = (folder / "index.html").read_text()
    m = re.search(r'<script id="mclx-data" type="application/json">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


def floats(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


@pytest.fixture
def view(view_folder):
    """The session's view of ``slide_predictions`` (conftest), read only."""
    return view_folder


def test_view_folder_has_the_pyramid_the_page_and_openseadragon(view, slide_predictions):
    slide = open_slide(slide_predictions["slide"])
    W, H = slide.dimensions
    dzi = ET.parse(view / "slide.dzi").getroot()
    tile, overlap = int(dzi.get("TileSize")), int(dzi.get("Overlap"))
    size = dzi.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert (int(size.get("Width")), int(size.get("Height"))) == (W, H)
    levels = sorted(int(p.name) for p in (view / "slide_files").iterdir())
    assert levels == list(range(math.ceil(math.log2(max(W, H))) + 1))  # down to 1 x 1 px
    top = view / "slide_files" / str(levels[-1])
    cols, rows = math.ceil(W / tile), math.ceil(H / tile)
    assert len(list(top.iterdir())) == cols * rows
    last = Image.open(top / f"{cols - 1}_{rows - 1}.jpeg")
    assert last.size == (W - (cols - 1) * tile + overlap, H - (rows - 1) * tile + overlap)
    # the pyramid's last level is the slide: a tile's pixels are the slide's there (up to
    # JPEG q85), and not those one pixel beside (the synthetic tissue is textured)
    got = np.asarray(Image.open(top / "1_1.jpeg"), dtype=np.float64)

    def error(dx: int) -> float:
        want = slide.read(tile - overlap + dx, tile - overlap, got.shape[0])
        return np.abs(got - want[:, : got.shape[1]]).mean()

    assert error(0) < 6 and error(0) < 0.6 * min(error(-1), error(1))
    data = page_data(view)
    assert data["dzi"]["Image"]["Size"] == {"Width": str(W), "Height": str(H)}
    assert data["dzi"]["Image"]["TileSize"] == str(tile) and data["dzi"]["Image"]["Url"] == (
        "slide_files/"
    )
    assert (view / "openseadragon" / "openseadragon.min.js").is_file()
    assert (view / "openseadragon" / "LICENSE.txt").is_file()
    assert (view / "openseadragon" / "images" / "home_rest.png").is_file()
    html = (view / "index.html").read_text()
    assert '<script src="openseadragon/openseadragon.min.js"></script>' in html
    assert {p.name for p in view.iterdir()} >= {"view.js", "view.css", "mclx-view.json"}


def test_page_data_are_the_predictions(view, slide_predictions):
    pred = ad.read_h5ad(slide_predictions["h5ad"])
    data = page_data(view)
    assert data["n_obs"] == pred.n_obs and data["ids"] == list(pred.obs_names)
    assert data["genes"] == list(pred.var_names)
    values = floats(data["values"]).reshape(pred.n_obs, pred.n_vars)
    np.testing.assert_array_equal(values, np.asarray(pred.X, dtype=np.float32))
    np.testing.assert_array_equal(floats(data["x"]), pred.obsm["spatial"][:, 0])
    np.testing.assert_array_equal(floats(data["y"]), pred.obsm["spatial"][:, 1])
    assert data["size"] == pred.uns["mclx"]["tile_size_level0"] and data["shape"] == "square"
    assert data["gene"] == pred.var_names[np.argmax(np.asarray(pred.X).var(0))]
    u = pred.uns["mclx"]
    meta = data["meta"]
    for key in ("checkpoint_fingerprint", "bank", "backend", "precision", "slide_vendor"):
        assert meta[key] == str(u[key])
    assert meta["timings"]["total"] == pytest.approx(u["timings"]["total"])
    assert len(data["lut"]) == 256 and data["lut"][0] == "#440154"  # viridis' first colour


def test_a_plain_image_gives_the_same_pyramid(view, slide_predictions, tmp_path):
    """S3.jpg (read by PIL, tiled through OpenSlide's ImageSlide) is the image the TIFF
    was written from: same layout, same pixels."""
    out = tmp_path / "jpeg_view"
    res = mclx("view", slide_predictions["h5ad"], "--slide", slide_predictions["jpeg"],
               "--genes", "GENE001,GENE002", "--gene", "GENE002", "--out", out, "-q")  # fmt: skip
    assert res.returncode == 0, res.stderr
    a, b = sorted((out / "slide_files").rglob("*.jpeg")), sorted((view / "slide_files").rglob("*"))
    assert [p.relative_to(out) for p in a] == [
        p.relative_to(view) for p in b if p.suffix == ".jpeg"
    ]
    top = max(int(p.name) for p in (out / "slide_files").iterdir())
    for name in ("0_0.jpeg", "2_3.jpeg"):
        x = np.asarray(Image.open(out / "slide_files" / str(top) / name), dtype=np.float64)
        y = np.asarray(Image.open(view / "slide_files" / str(top) / name), dtype=np.float64)
        assert np.abs(x - y).mean() < 1
    data = page_data(out)
    assert data["genes"] == ["GENE001", "GENE002"] and data["gene"] == "GENE002"
    assert data["meta"]["slide"] == str(slide_predictions["jpeg"].resolve())


def test_view_replaces_its_own_folder_and_nothing_else(view, slide_predictions, tmp_path):
    out = tmp_path / "v"
    shutil.copytree(view, out)  # as mclx wrote it (its manifest): replaced whole
    res = mclx("view", slide_predictions["h5ad"], "--genes", "GENE003", "--out", out, "-q")
    assert res.returncode == 0, res.stderr
    assert page_data(out)["genes"] == ["GENE003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # no temporary folder left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my page")
    res = mclx("view", slide_predictions["h5ad"], "--out", mine, "-q")
    assert_one_line_error(res, str(mine), "not an mclx view", "mclx-view.json")
    assert (mine / "index.html").read_text() == "my page"


def test_view_refusals_are_one_line(slide_predictions, tmp_path, monkeypatch, capsys):
    h5ad = slide_predictions["h5ad"]
    out = tmp_path / "out"
    cases = [
        (["view", tmp_path / "none.h5ad"], ["none.h5ad", "does not exist"]),
        (["view", slide_predictions["geojson"]], ["S3.geojson", "cannot read it as .h5ad"]),
        (["view", h5ad, "--gene", "NOPE"], ["--gene NOPE is not in the predictions"]),
        (["view", h5ad, "--genes", "NOPE,GENE001"], ["--genes not in the predictions: NOPE"]),
        (["view", h5ad, "--slide", tmp_path / "none.tif"], ["none.tif", "does not exist"]),
    ]
    small = tmp_path / "small.png"
    Image.new("RGB", (300, 200), "white").save(small)
    cases.append((["view", h5ad, "--slide", small], ["small.png", "not the slide"]))
    moved = ad.read_h5ad(h5ad)
    moved.uns["mclx"]["slide"] = str(tmp_path / "gone" / "S3.tif")
    moved.write_h5ad(tmp_path / "moved.h5ad")
    cases.append((["view", tmp_path / "moved.h5ad"], ["moved.h5ad", "gone/S3.tif", "--slide"]))
    for args, needles in cases:
        assert_one_line_error(run_cli(capsys, [*args, "--out", out, "-q"]), *needles)
    monkeypatch.setenv("MCLX_OPENSEADRAGON", str(tmp_path))
    res = run_cli(capsys, ["view", h5ad, "--out", out])
    assert_one_line_error(res, "MCLX_OPENSEADRAGON", "min.js")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved.h5ad", "small.png"]


def test_a_corrupt_slide_fails_cleanly_and_keeps_the_previous_view(view, slide_predictions,
                                                                    tmp_path):  # fmt: skip
    out = tmp_path / "v"
    shutil.copytree(view, out)
    before = (out / "index.html").read_bytes()
    data = slide_predictions["slide"].read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])  # header and offsets intact, pixels cut off
    res = mclx("view", slide_predictions["h5ad"], "--slide", cut, "--out", out, "-q")
    assert_one_line_error(res, "cut.tif")
    assert (out / "index.html").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tif", "v"]
