"""Predictions that other tools open as they are (issue 15): scanpy's spatial layout in
the ``.h5ad`` (``sc.pl.spatial``), GeoJSON for QuPath (``--geojson``), a SpatialData store
(``--spatialdata``). All read the output of one real ``mclx infer`` run over a pyramidal
TIFF (the ``slide_predictions`` fixture)."""

from __future__ import annotations

import json
import math
import warnings

import anndata as ad
import numpy as np
import pytest
from helpers import assert_one_line_error, needs, run_cli

from mclx.data.slide import open_slide


@pytest.fixture(scope="module")
def pred(slide_predictions):
    return ad.read_h5ad(slide_predictions["h5ad"])


def test_h5ad_holds_the_slide_as_scanpy_expects(pred, slide_predictions):
    (lib, entry), *others = pred.uns["spatial"].items()
    assert others == [] and lib == "S3"
    hires = entry["images"]["hires"]
    sf = entry["scalefactors"]
    slide = open_slide(slide_predictions["slide"])
    W, H = slide.dimensions
    scale = sf["tissue_hires_scalef"]
    assert hires.dtype == np.uint8 and hires.shape == (round(H * scale), round(W * scale), 3)
    assert max(hires.shape[:2]) == 2000
    assert sf["spot_diameter_fullres"] == pred.uns["mclx"]["tile_size_level0"]
    # the image is the slide: the hires pixel under each tile centre is the slide's there
    thumb, f = slide.thumbnail(2000)
    assert f == pytest.approx(1 / sf["tissue_hires_scalef"])
    np.testing.assert_array_equal(hires, thumb)


def test_sc_pl_spatial_plots_a_prediction_as_it_is(pred, slide_predictions, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    adata = sc.read_h5ad(slide_predictions["h5ad"])
    gene = adata.var_names[np.argmax(np.asarray(adata.X).var(0))]
    with warnings.catch_warnings():  # scanpy 1.11 points to squidpy; the call still works
        warnings.simplefilter("ignore", FutureWarning)
        (ax,) = sc.pl.spatial(adata, color=gene, show=False)
    sf = adata.uns["spatial"]["S3"]["scalefactors"]["tissue_hires_scalef"]
    (image,) = ax.images
    assert image.get_array().shape == adata.uns["spatial"]["S3"]["images"]["hires"].shape
    (spots,) = ax.collections
    paths = spots.get_paths()
    assert len(paths) == adata.n_obs
    centres = np.array([(p.vertices.min(0) + p.vertices.max(0)) / 2 for p in paths])
    radii = np.array([(p.vertices.max(0) - p.vertices.min(0)) / 2 for p in paths])
    np.testing.assert_allclose(radii, adata.uns["mclx"]["tile_size_level0"] * sf / 2, rtol=1e-3)
    # each circle sits on its tile's centre and is coloured by that tile's prediction
    want = np.asarray(adata.obsm["spatial"]) * sf
    match = np.argmin(((centres[:, None] - want[None]) ** 2).sum(-1), axis=1)
    assert sorted(match) == list(range(adata.n_obs))
    np.testing.assert_allclose(centres, want[match], atol=0.5)
    np.testing.assert_allclose(spots.get_array(), np.asarray(adata[:, gene].X).ravel()[match])
    png = tmp_path / "sc_pl_spatial.png"
    ax.figure.savefig(png)
    print(f"sc.pl.spatial figure: {png}")


def _signed_area(ring) -> float:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:])) / 2


def test_geojson_is_a_feature_collection_qupath_and_shapely_read(pred, slide_predictions):
    import shapely
    from shapely.geometry import shape

    text = slide_predictions["geojson"].read_text()
    doc = json.loads(text)
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == pred.n_obs
    size = pred.uns["mclx"]["tile_size_level0"]
    X = np.asarray(pred.X)
    top5 = [pred.var_names[j] for j in np.argsort(-X.astype(np.float64).mean(0))[:5]]
    for i, feat in enumerate(doc["features"]):
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        (ring,) = feat["geometry"]["coordinates"]
        assert len(ring) >= 4 and ring[0] == ring[-1]  # a closed linear ring
        assert all(isinstance(c, int | float) and math.isfinite(c) for p in ring for c in p)
        assert _signed_area(ring) > 0  # RFC 7946: exterior counterclockwise
        props = feat["properties"]
        assert props["objectType"] == "detection" and props["name"] == pred.obs_names[i]
        m = props["measurements"]
        assert list(m) == top5  # --geojson-genes 5: the highest mean predictions
        np.testing.assert_allclose([m[g] for g in top5], X[i, [pred.var_names.get_loc(g)
                                   for g in top5]], rtol=1e-6)  # fmt: skip
        poly = shape(feat["geometry"])
        assert poly.is_valid and poly.area == pytest.approx(size**2)
        np.testing.assert_allclose(poly.centroid.coords[0], pred.obsm["spatial"][i], atol=1e-2)
    whole = shapely.from_geojson(text)
    assert len(whole.geoms) == pred.n_obs


@needs("spatialdata")
def test_spatialdata_store_gives_back_the_predictions(pred, slide_predictions):
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    sdata = sd.read_zarr(slide_predictions["zarr"])
    table = sdata.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == (
        "S3_tiles", "region", "instance_id",
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(table.X), np.asarray(pred.X))
    assert list(table.obs_names) == list(pred.obs_names)
    assert list(table.var_names) == list(pred.var_names)
    shapes = sdata.shapes["S3_tiles"]
    assert list(shapes.index) == list(table.obs["instance_id"])
    centroids = np.stack([shapes.geometry.centroid.x, shapes.geometry.centroid.y], 1)
    np.testing.assert_allclose(centroids, pred.obsm["spatial"], atol=1e-6)
    size = pred.uns["mclx"]["tile_size_level0"]
    np.testing.assert_allclose(shapes.geometry.area, size**2)
    image = sdata.images["S3_image"]
    hires = pred.uns["spatial"]["S3"]["images"]["hires"]
    np.testing.assert_array_equal(np.moveaxis(np.asarray(image), 0, -1), hires)
    # the image's transformation puts its far corner on the slide's
    scale = get_transformation(image, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    W, H = open_slide(slide_predictions["slide"]).dimensions
    corner = scale @ np.array([hires.shape[1], hires.shape[0], 1.0])
    np.testing.assert_allclose(corner[:2], [W, H], rtol=1e-3)


def test_outputs_are_checked_before_any_work(capsys, monkeypatch, slide_predictions, tmp_path):
    d = slide_predictions
    base = ["infer", d["slide"], "--bank", d["h5ad"].parent / "bank.npz", "-q",
            "--out", tmp_path / "p.h5ad"]  # fmt: skip
    res = run_cli(capsys, [*base, "--geojson", tmp_path / "nowhere" / "p.geojson"])
    assert_one_line_error(res, "p.geojson", "does not exist")
    res = run_cli(capsys, [*base, "--geojson-genes", "5"])
    assert_one_line_error(res, "--geojson-genes needs --geojson")
    (tmp_path / "mine.zarr").mkdir()
    (tmp_path / "mine.zarr" / "notes.txt").write_text("not a store")
    res = run_cli(capsys, [*base, "--spatialdata", tmp_path / "mine.zarr"])
    if res.returncode and "not installed" in res.stderr:  # no spatialdata: refused for that
        assert_one_line_error(res, "--spatialdata", "mclx[spatialdata]")
    else:
        assert_one_line_error(res, "mine.zarr", "not a SpatialData store")
    assert (tmp_path / "mine.zarr" / "notes.txt").read_text() == "not a store"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "spatialdata"
                        else real(n, *a))  # fmt: skip
    res = run_cli(capsys, [*base, "--spatialdata", tmp_path / "new.zarr"])
    assert_one_line_error(res, "--spatialdata: spatialdata is not installed", "mclx[spatialdata]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.zarr"]  # nothing written
