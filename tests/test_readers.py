"""The reader registry (`mclx.data.readers`) on the real data of ../shared/data: each
layout's counts against an independent pandas / h5py read, its spots on its image, its
µm/px against the array's published pitch, and its bad inputs."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from helpers import needs, shared_path

from mclx.data.readers import LAYOUTS, layout_names, open_data
from mclx.errors import DataError


def nearest_px(xy: np.ndarray) -> float:
    """Median distance from each spot to its nearest neighbour, in pixels."""
    from scipy.spatial import cKDTree

    return float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))


def test_registry_lists_every_layout_and_refuses_unknown_ones(tmp_path):
    assert sorted(layout_names()) == ["her2st", "hest", "stutility", "visium"]
    assert all(LAYOUTS[n].name == n and LAYOUTS[n].looks_for for n in LAYOUTS)
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError) as info:
        open_data(tmp_path)
    for name in ("her2st", "stutility", "visium", "hest"):
        assert f"{name}:" in str(info.value)
    with pytest.raises(KeyError, match="did you mean visium"):
        open_data(tmp_path, "visum")
    with pytest.raises(DataError, match="not a hest data folder"):
        open_data(tmp_path, "hest")


# --- legacy ST / STUtility (mouse olfactory bulb, 2k array) ------------------------


@pytest.fixture(scope="module")
def mob():
    return open_data(shared_path("stutility-mob"))


@needs("stutility-mob")
def test_stutility_counts_coordinates_and_mpp(mob):
    root = shared_path("stutility-mob")
    assert mob.name == "stutility" and mob.sections() == ["MOB1", "MOB2", "MOB3", "MOB4"]
    a = mob.read_section("MOB1")
    counts = pd.read_csv(root / "MOB1.tsv", sep="\t", index_col=0)
    spots = pd.read_csv(root / "alignment_table_MOB1.tsv", sep="\t")
    spots = spots[spots.selected == 1]
    spots.index = spots.x.astype(str) + "x" + spots.y.astype(str)
    keep = [i for i in counts.index if i in spots.index]
    assert a.n_obs == len(keep) == 379
    assert list(a.var_names) == list(counts.columns)
    assert a.var_names[0].startswith("ENSMUSG")  # mouse Ensembl ids, as the data has them
    np.testing.assert_array_equal(a.X.toarray(), counts.loc[keep].to_numpy(np.float32))
    np.testing.assert_allclose(a.obsm["spatial"], spots.loc[keep, ["pixel_x", "pixel_y"]])
    from PIL import Image

    with Image.open(root / "MOB1.jpg") as im:
        w, h = im.size
    assert (a.obsm["spatial"] >= 0).all() and (a.obsm["spatial"] < [w, h]).all()
    # the 2k array: nearest spots 141 µm apart (STUtility's min.spot.distance)
    assert a.uns["array"] == "2k"
    assert a.uns["mpp"] == pytest.approx(141.0 / nearest_px(a.obsm["spatial"]), rel=0.03)
    assert 3.5 < a.uns["mpp"] < 5.0  # nowhere near her2st's 0.7 µm/px


@needs("stutility-mob")
def test_stutility_mpp_override_and_patches_resampled(mob):
    from mclx.data.patches import section_patches

    a = open_data(shared_path("stutility-mob"), "stutility", mpp=2.0).read_section("MOB2")
    assert a.uns["mpp"] == 2.0
    b = mob.read_section("MOB2")
    # 224 px at 1.0 µm/px from an image at ~4.4 µm/px: ~51 source px, upsampled
    native = section_patches(b, 224)
    fine = section_patches(b, 224, mpp=b.uns["mpp"] / 4)
    assert native.shape == fine.shape == (b.n_obs, 224, 224, 3)
    # the centre quarter of a native patch is the tissue of the whole 4x patch
    from PIL import Image

    centre = native[0, 84:140, 84:140]
    down = np.asarray(Image.fromarray(fine[0]).resize((56, 56), Image.BILINEAR))
    corr = np.corrcoef(centre.astype(float).ravel(), down.astype(float).ravel())[0, 1]
    assert corr > 0.8, corr


@needs("stutility-mob")
def test_stutility_spots_that_match_no_counts(tmp_path):
    root = tmp_path / "mob"
    shutil.copytree(shared_path("stutility-mob"), root)
    table = root / "alignment_table_MOB3.tsv"
    df = pd.read_csv(table, sep="\t")
    df["x"] += 100  # every spot id now names a position the counts do not have
    df.to_csv(table, sep="\t", index=False)
    with pytest.raises(DataError, match="MOB3.tsv: no spot in common with .*alignment_table_MOB3"):
        open_data(root).read_section("MOB3")


# --- 10x Visium Space Ranger outs --------------------------------------------------


@pytest.fixture(scope="module")
def visium_h5():
    """The counts of the fixture read with h5py alone (10x's CSC layout)."""
    with h5py.File(shared_path("visium-fixture") / "filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        shape = tuple(m["shape"][()])
        x = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=shape)
        barcodes = [b.decode() for b in m["barcodes"][()]]
        genes = [g.decode() for g in m["features"]["name"][()]]
    return x.T.toarray().astype(np.float32), barcodes, genes


def _positions() -> pd.DataFrame:
    cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"]
    path = shared_path("visium-fixture") / "spatial" / "tissue_positions_list.csv"
    return pd.read_csv(path, header=None, names=cols).set_index("barcode")


@needs("visium-fixture")
def test_visium_counts_positions_and_mpp(visium_h5):
    x, barcodes, genes = visium_h5
    data = open_data(shared_path("visium-fixture"))
    assert data.name == "visium" and data.sections() == ["visium-fixture"]
    a = data.read_section("visium-fixture")
    pos = _positions().loc[barcodes]
    keep = pos["in_tissue"].to_numpy() == 1
    assert a.n_obs == keep.sum() > 0
    np.testing.assert_array_equal(a.X.toarray(), x[keep])
    assert len(set(genes)) < len(genes) or list(a.var_names) == genes
    scalef = json.loads(
        (shared_path("visium-fixture") / "spatial/scalefactors_json.json").read_text()
    )
    hires = scalef["tissue_hires_scalef"]
    np.testing.assert_allclose(a.obsm["spatial"], pos[keep][["pxl_col", "pxl_row"]] * hires)
    np.testing.assert_array_equal(a.obs["x"], pos[keep]["array_col"])
    assert a.uns["image_path"].endswith("tissue_hires_image.png")
    assert (a.obsm["spatial"] < 2000).all() and (a.obsm["spatial"] > 0).all()
    # spots 100 µm apart on the full grid (every position of the positions file)
    full = _positions()[["pxl_col", "pxl_row"]].to_numpy(float)
    assert a.uns["mpp"] == pytest.approx(100.0 / nearest_px(full) / hires, rel=0.02)
    # Space Ranger's spot_diameter_fullres spans a nominal 65 µm spot
    assert a.uns["mpp"] * hires == pytest.approx(65 / scalef["spot_diameter_fullres"], rel=0.02)


@pytest.fixture
def visium_copy(tmp_path):
    root = tmp_path / "V9"
    shutil.copytree(shared_path("visium-fixture"), root)
    return root


@needs("visium-fixture")
@pytest.mark.parametrize("layout", ["csv_with_header", "parquet"])
def test_visium_positions_in_newer_layouts(visium_copy, layout):
    old = open_data(visium_copy).read_section("V9")
    spatial = visium_copy / "spatial"
    pos = pd.read_csv(spatial / "tissue_positions_list.csv", header=None)
    pos.columns = [
        "barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"
    ]  # fmt: skip
    (spatial / "tissue_positions_list.csv").unlink()
    if layout == "parquet":
        pos.to_parquet(spatial / "tissue_positions.parquet")
    else:
        pos.to_csv(spatial / "tissue_positions.csv", index=False)
    new = open_data(visium_copy).read_section("V9")
    assert new.uns["spots_path"].endswith("parquet" if layout == "parquet" else ".csv")
    np.testing.assert_array_equal(new.obsm["spatial"], old.obsm["spatial"])
    np.testing.assert_array_equal(new.X.toarray(), old.X.toarray())


@needs("visium-fixture")
def test_visium_bad_inputs(visium_copy, tmp_path, visium_h5):
    spatial = visium_copy / "spatial"
    pos = pd.read_csv(spatial / "tissue_positions_list.csv", header=None)
    lost = pos[0].isin(visium_h5[1][:5])  # five barcodes of the counts lose their position
    pos[~lost].to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    with pytest.raises(
        DataError, match="positions do not match the counts .*: 5 of 100 barcodes have none"
    ):
        open_data(visium_copy).read_section("V9")
    pos.to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    factors = (spatial / "scalefactors_json.json").read_text()
    (spatial / "scalefactors_json.json").write_text("[0.15]")
    with pytest.raises(DataError, match="json: scale factors must be a JSON object, not an array"):
        open_data(visium_copy).read_section("V9")
    (spatial / "scalefactors_json.json").write_text(factors.replace("tissue_hires", "hires"))
    with pytest.raises(DataError, match="no valid tissue_hires_scalef .*or pass --image"):
        open_data(visium_copy).read_section("V9")
    (spatial / "scalefactors_json.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"scalefactors_json.json: missing \(.*hires image; or pass --image"
    ):
        open_data(visium_copy).read_section("V9")
    # a full-resolution image needs no scale factor; these spots do not fit a small one
    small = tmp_path / "fullres.png"
    shutil.copy(spatial / "tissue_lowres_image.png", small)
    with pytest.raises(DataError, match="spots lie outside the 600x600 image"):
        open_data(visium_copy, images={"V9": small}).read_section("V9")


@needs("visium-fixture")
def test_space_ranger_scale_factors_are_read_as_for_visium(tmp_path):
    """An outs folder given as a slide reads its scale factor as the Visium reader does
    (:func:`mclx.data.spaceranger.scale_factor`), with a hint that fits ``mclx infer
    OUTS/``: there is no --image there, but a full-resolution image beside spatial/."""
    from PIL import Image

    from mclx.data.spaceranger import spaceranger_image

    spatial = tmp_path / "outs" / "spatial"
    spatial.mkdir(parents=True)
    spatial.joinpath("tissue_positions_list.csv").write_text("AAA-1,1,0,0,10,10\n")
    Image.new("RGB", (64, 64), "white").save(spatial / "tissue_hires_image.png")
    with pytest.raises(FileNotFoundError, match=r"scalefactors_json.json: missing \(") as info:
        spaceranger_image(tmp_path / "outs")
    assert "--image" not in str(info.value)
    assert "full-resolution image beside spatial/" in str(info.value)
    spatial.joinpath("scalefactors_json.json").write_text('{"tissue_hires_scalef": 0}')
    with pytest.raises(DataError, match="tissue_hires_scalef must be positive"):
        spaceranger_image(tmp_path / "outs")
    spatial.joinpath("scalefactors_json.json").write_text('{"tissue_hires_scalef": 0.5}')
    assert spaceranger_image(tmp_path / "outs").scale == 0.5


def test_json_files_of_the_layouts_are_objects_or_absent(tmp_path):
    """The JSON files the layouts read (scale factors, HEST metadata) share one reader:
    absent is {}, anything but an object is refused saying what it is."""
    from mclx.data.jsonfile import json_object

    path = tmp_path / "f.json"
    assert json_object(path, "things") == {}
    for text, got in (("3.5", "a number"), ("null", "null"), ('"x"', "a string")):
        path.write_text(text)
        with pytest.raises(DataError, match=f"f.json: things must be a JSON object, not {got}$"):
            json_object(path, "things")
    path.write_text('{"a": 1')
    with pytest.raises(DataError, match="f.json: cannot read things"):
        json_object(path, "things")
    path.write_text('{"a": 1}')
    assert json_object(path, "things") == {"a": 1}


def test_a_folder_of_outs_is_one_section_each(tmp_path):
    for name in ("V1", "V2"):
        shutil.copytree(shared_path("visium-fixture"), tmp_path / name / "outs")
    data = open_data(tmp_path)
    assert data.name == "visium" and data.sections(with_image=True) == ["V1", "V2"]
    adatas = data.read()
    assert adatas["V2"].obs_names[0].startswith("V2_")
    assert data.extent() == (128, 78)  # the Visium array, from the positions files


# --- HEST-1k sample layout ---------------------------------------------------------


@pytest.fixture(scope="module")
def hest(her2st, tmp_path_factory):
    """her2st's C2 as a HEST-1k sample: the image 4x smaller as a pyramidal TIFF, the
    spots in its pixels, the counts in an h5ad whose spot names carry the array
    coordinates, the µm/px in the metadata."""
    import anndata as ad
    from PIL import Image

    from mclx.data.her2st import read_section
    from mclx.data.slide import write_pyramidal_tiff

    c2 = read_section(her2st, "C2")
    root = tmp_path_factory.mktemp("hest")
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir()
    with Image.open(c2.uns["image_path"]) as im:
        small = np.asarray(im.convert("RGB").reduce(4))
    write_pyramidal_tiff(small, root / "wsis" / "C2.tif", mpp=c2.uns["mpp"] * 4, levels=2)
    sample = ad.AnnData(X=c2.X.copy(), var=c2.var.copy())
    sample.obs_names = [n.split("_", 1)[1] for n in c2.obs_names]  # "XxY"
    sample.obsm["spatial"] = c2.obsm["spatial"] / 4
    sample.write_h5ad(root / "st" / "C2.h5ad")
    meta = {
        "pixel_size_um_estimated": c2.uns["mpp"] * 4,
        "st_technology": "Spatial Transcriptomics",
    }
    (root / "metadata" / "C2.json").write_text(json.dumps(meta))
    return root, c2, small


@needs("her2st")
def test_hest_sample_matches_its_source(hest):
    root, c2, small = hest
    data = open_data(root)
    assert data.name == "hest" and data.sections(with_image=True) == ["C2"]
    a = data.read_section("C2")
    np.testing.assert_array_equal(a.X.toarray(), c2.X.toarray())
    np.testing.assert_array_equal(a.obs[["x", "y"]].to_numpy(), c2.obs[["x", "y"]].to_numpy())
    np.testing.assert_allclose(a.obsm["spatial"], c2.obsm["spatial"] / 4)
    assert a.uns["mpp"] == pytest.approx(c2.uns["mpp"] * 4, rel=1e-12)
    assert a.uns["array"] == "1k"
    # patches read region by region from the WSI, as the pixels of the TIFF say
    from mclx.data.patches import section_patches

    native = section_patches(a, 64)
    cx, cy = np.floor(a.obsm["spatial"][0]).astype(int)
    np.testing.assert_array_equal(native[0], small[cy - 32 : cy + 32, cx - 32 : cx + 32])
    # at the source's µm/px a patch covers what her2st's does: the same tissue
    fine = section_patches(a, 224, mpp=c2.uns["mpp"])
    ref = section_patches(c2, 224)[:5].astype(float)
    corr = np.corrcoef(fine[:5].astype(float).ravel(), ref.ravel())[0, 1]
    assert corr > 0.8, corr


@needs("her2st")
def test_hest_bad_inputs(hest, tmp_path):
    import anndata as ad

    root = tmp_path / "h"
    shutil.copytree(hest[0], root)
    meta = root / "metadata" / "C2.json"
    good = meta.read_text()
    meta.write_text("[1, 2]")
    with pytest.raises(DataError, match="C2.json: sample metadata must be a JSON object, not an"):
        open_data(root).read_section("C2")
    meta.write_text("{")
    with pytest.raises(DataError, match="C2.json: cannot read sample metadata"):
        open_data(root).read_section("C2")
    meta.write_text(good)
    a = ad.read_h5ad(root / "st" / "C2.h5ad")
    del a.obsm["spatial"]
    a.write_h5ad(root / "st" / "C2.h5ad")
    with pytest.raises(DataError, match=r"C2.h5ad: obsm\['spatial'\] must hold"):
        open_data(root).read_section("C2")
    (root / "st" / "C2.h5ad").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="C2.h5ad: cannot read AnnData"):
        open_data(root).read_section("C2")


# --- infer --spots: spots from data of any layout -----------------------------------


@needs("visium-fixture", "stutility-mob")
def test_infer_spots_from_data(tmp_path):
    from mclx.data.readers import read_spots, spot_mpp

    outs = shared_path("visium-fixture")
    spots, kind = read_spots(outs)  # a one-section Visium folder: full-resolution pixels
    pos = _positions()
    pos = pos[pos["in_tissue"] == 1]
    assert kind == "visium" and list(spots["id"]) == list(pos.index)
    np.testing.assert_array_equal(spots[["x", "y"]], pos[["pxl_col", "pxl_row"]])
    hires = open_data(outs).read_section("visium-fixture").uns["mpp"]
    factors = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    assert spot_mpp(spots, kind) == pytest.approx(hires * factors["tissue_hires_scalef"])
    # the MOB spot file alone: the 2k array is recognised, so the µm/px is ~4.4, not ~8.8
    mob, kind = read_spots(shared_path("stutility-mob") / "alignment_table_MOB1.tsv")
    assert spot_mpp(mob, kind) == pytest.approx(
        open_data(shared_path("stutility-mob")).read_section("MOB1").uns["mpp"], rel=1e-9
    )
    with pytest.raises(DataError, match="--spots takes one section.* has 4 .*MOB1"):
        read_spots(shared_path("stutility-mob"))


@needs("her2st")
def test_infer_spots_from_a_hest_h5ad(hest):
    from mclx.data.readers import read_spots, spot_mpp

    root, c2, _ = hest
    spots, kind = read_spots(root / "st" / "C2.h5ad")
    np.testing.assert_allclose(spots[["x", "y"]], c2.obsm["spatial"] / 4)
    assert spot_mpp(spots, kind) == pytest.approx(c2.uns["mpp"] * 4, rel=1e-12)


def test_cli_names_the_layouts_it_looked_for(tmp_path, capsys):
    from helpers import assert_one_line_error, run_cli

    (tmp_path / "empty").mkdir()
    res = run_cli(capsys, ["bank", "build", "--ckpt", tmp_path / "m.pt", "--data",
                           tmp_path / "empty", "--out", tmp_path / "b.npz"])  # fmt: skip
    assert_one_line_error(res, "empty: no known data layout", "visium: filtered_feature_bc_matrix")
    res = run_cli(capsys, ["train", "--data", tmp_path / "empty", "--layout", "hest",
                           "--out", tmp_path / "m.pt"])  # fmt: skip
    assert_one_line_error(res, "not a hest data folder (looked for st/ID.h5ad")
    res = run_cli(capsys, ["train", "--data", tmp_path, "--layout", "visum", "--out", "m.pt"])
    assert_one_line_error(res, "--layout", "visium")
    assert not (tmp_path / "b.npz").exists() and not (tmp_path / "m.pt").exists()


@needs("stutility-mob")
def test_evaluate_runs_on_the_mob_sections(tmp_path, capsys):
    """Leave-one-section-out on another tissue, species and array (tiny model)."""
    from helpers import run_cli

    out = tmp_path / "mob.json"
    res = run_cli(capsys, [
        "evaluate", "--data", shared_path("stutility-mob"), "--sections", "MOB1,MOB2",
        "--encoder", "tiny_cnn", "--encoder-weights", "none", "--freeze-encoder",
        "--epochs", 1, "--batch-size", 64, "--n-hvg", 50, "--k", 50, "-q", "--out", out,
    ])  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "MOB1" in res.stdout and "MOB2" in res.stdout and "mean±std" in res.stdout
    saved = json.loads(out.read_text())
    assert saved["config"]["layout"] == "stutility" and saved["config"]["n_genes"] == 50
    assert 3.5 < saved["config"]["preprocess"]["mpp"] < 5.0  # the 2k array's µm/px
    assert saved["folds"]["MOB2"]["train"] == ["MOB1"]
    assert all(g.startswith("ENSMUSG") for g in saved["folds"]["MOB2"]["genes"])
    import anndata as ad

    pred = ad.read_h5ad(tmp_path / "mob.predictions.h5ad")
    assert set(pred.obs["section"]) == {"MOB1", "MOB2"} and "measured" in pred.layers
