"""A lab's first afternoon (issue #29): the data people actually have.

- a Space Ranger ``outs/`` folder without its full-resolution image is a slide: the hires
  image, the spots scaled by its factor, the µm/px from the spot diameter;
- Visium positions given with the hires image: the message names the scale factor;
- spots drawn at their real size (scanpy, QuPath), tiles as tiles;
- a section the bank holds: ``mclx infer`` warns that it predicts from its own spots.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from helpers import assert_one_line_error, mclx, needs

from mclx.data.synthetic import write_synthetic_her2st


@pytest.fixture(scope="module")
def tiny_bank(tmp_path_factory) -> dict[str, Path]:
    """A tiny model and a bank of synthetic sections S1, S2 (S3 held out)."""
    from helpers.models import tiny_model

    from mclx.bank import build_bank, save_bank

    folder = tmp_path_factory.mktemp("lab")
    data = write_synthetic_her2st(folder / "syn")
    ck = tiny_model(data).save(folder / "m.pt")
    bank = save_bank(build_bank(ck, data, sections=["S1", "S2"]), folder / "bank.npz")
    return {"data": data, "model": ck, "bank": Path(bank)}


def _visium_copy(src: Path, dst: Path, n: int = 40) -> Path:
    """The Visium fixture's spatial/ folder with its first ``n`` positions only (the
    test's run stays short): an outs folder without counts or full-resolution image."""
    (dst / "spatial").mkdir(parents=True)
    for name in ("scalefactors_json.json", "tissue_hires_image.png", "tissue_lowres_image.png"):
        shutil.copy(src / "spatial" / name, dst / "spatial" / name)
    lines = (src / "spatial" / "tissue_positions_list.csv").read_text().splitlines()
    kept = [ln for ln in lines if ln.split(",")[1] == "1"][:n]
    (dst / "spatial" / "tissue_positions_list.csv").write_text("\n".join(kept) + "\n")
    return dst


@needs("visium-fixture")
def test_infer_on_a_space_ranger_folder_places_the_spots_on_the_hires_image(tiny_bank, tmp_path):
    from helpers.data import shared_path

    outs = _visium_copy(shared_path("visium-fixture"), tmp_path / "V1" / "outs")
    out = tmp_path / "v.h5ad"
    res = mclx("infer", outs, "--bank", tiny_bank["bank"], "--out", out, "-q")
    assert res.returncode == 0, res.stderr
    assert list(ad.read_h5ad(out).uns["spatial"]) == ["V1"]  # the sample, not "outs"
    assert "tissue_hires_image.png (hires, spots scaled by its factor 0.150015" in res.stderr
    factors = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    with open(outs / "spatial" / "tissue_positions_list.csv") as fh:  # read independently
        rows = {r[0]: (float(r[5]), float(r[4])) for r in csv.reader(fh)}
    pred = ad.read_h5ad(out)
    want = np.array([rows[b] for b in pred.obs_names]) * factors["tissue_hires_scalef"]
    np.testing.assert_allclose(pred.obsm["spatial"], want, rtol=1e-9)
    assert len(pred.obs_names) == len(rows)
    u = pred.uns["mclx"]
    # spot_diameter_fullres spans 65 µm (Space Ranger's documentation) ...
    mpp = 65.0 / factors["spot_diameter_fullres"] / factors["tissue_hires_scalef"]
    assert u["slide_mpp"] == pytest.approx(mpp)
    # ... which the 100 µm pitch of spots two array columns apart confirms
    with open(outs / "spatial" / "tissue_positions_list.csv") as fh:
        grid = {(int(r[2]), int(r[3])): float(r[5]) for r in csv.reader(fh)}
    steps = [grid[k] - grid[(k[0], k[1] - 2)] for k in grid if (k[0], k[1] - 2) in grid]
    pitch_mpp = 100.0 / (np.median(steps) * factors["tissue_hires_scalef"])
    assert u["slide_mpp"] == pytest.approx(pitch_mpp, rel=0.03)
    (lib,) = pred.uns["spatial"].values()  # drawn at the 55 µm spot
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(55.0 / mpp)
    assert u["slide_mpp_source"].startswith("spot diameter")
    assert list(u["slide_size"]) == [2000, 2000]


@needs("visium-fixture")
def test_visium_positions_on_the_hires_image_name_the_scale_factor(tiny_bank, tmp_path):
    from helpers.data import shared_path

    outs = _visium_copy(shared_path("visium-fixture"), tmp_path / "outs")
    spatial = outs / "spatial"
    res = mclx("infer", spatial / "tissue_hires_image.png", "--spots",
               spatial / "tissue_positions_list.csv", "--bank", tiny_bank["bank"],
               "--out", tmp_path / "v.h5ad", "-q")  # fmt: skip
    assert_one_line_error(res, "spots lie outside", "tissue_hires_scalef 0.150015",
                          f"mclx infer {outs}")  # fmt: skip
    assert not (tmp_path / "v.h5ad").exists()


def test_a_space_ranger_folder_with_spots_is_refused(tiny_bank, tmp_path):
    (tmp_path / "outs" / "spatial").mkdir(parents=True)
    spatial = tmp_path / "outs" / "spatial"
    spatial.joinpath("tissue_positions_list.csv").write_text("AAA-1,1,0,0,10,10\n")
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(spatial / "tissue_hires_image.png")
    spatial.joinpath("scalefactors_json.json").write_text('{"tissue_hires_scalef": 0.5}')
    res = mclx("infer", tmp_path / "outs", "--spots", spatial / "tissue_positions_list.csv",
               "--bank", tiny_bank["bank"], "--out", tmp_path / "v.h5ad", "-q")  # fmt: skip
    assert_one_line_error(res, "a Space Ranger folder brings its own spots")


# --------------------------------------------------------------------------- leakage


def _infer_section(tiny_bank, image: Path, section: str, out: Path, bank=None):
    spots = tiny_bank["data"] / "data" / "ST-spotfiles" / f"{section}_selection.tsv"
    return mclx("infer", image, "--spots", spots, "--bank", bank or tiny_bank["bank"],
                "--out", out, "-q")  # fmt: skip


def _warnings(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("mclx: warning: ")]


def test_infer_on_a_section_the_bank_holds_warns_by_its_image(tiny_bank, tmp_path):
    """The bank records its sections' images: a copy of S1's image under another name
    is known by its bytes; a held-out section (S3) gives no warning."""
    data = tiny_bank["data"] / "data" / "ST-imgs" / "S"
    copy = tmp_path / "renamed.jpg"
    shutil.copy(data / "S1" / "S1.jpg", copy)
    res = _infer_section(tiny_bank, copy, "S1", tmp_path / "a.h5ad")
    assert res.returncode == 0, res.stderr
    (line,) = _warnings(res)
    assert "holds this slide's section" in line and "section S1's image" in line, line
    assert "mclx bank build --sections" in line
    res = _infer_section(tiny_bank, data / "S3" / "S3.jpg", "S3", tmp_path / "b.h5ad")
    assert res.returncode == 0, res.stderr
    assert _warnings(res) == []


def test_a_bank_without_image_hashes_warns_by_section_name(tiny_bank, tmp_path):
    """A bank of an mclx before the image hashes: the slide's name is a section's."""
    with np.load(tiny_bank["bank"], allow_pickle=False) as z:
        old = {k: z[k] for k in z.files if not k.startswith("image_")}
    np.savez(tmp_path / "old.npz", **old)
    image = tiny_bank["data"] / "data" / "ST-imgs" / "S" / "S2" / "S2.jpg"
    res = _infer_section(tiny_bank, image, "S2", tmp_path / "a.h5ad", bank=tmp_path / "old.npz")
    assert res.returncode == 0, res.stderr
    (line,) = _warnings(res)
    assert "named like the bank's section S2" in line, line


# --------------------------------------------------------------------------- legacy ST

MOB_FOV_UM = 150.0  # a field wider than a spot (100 µm) and its pitch (141 µm)


@pytest.fixture(scope="module")
def mob(tmp_path_factory) -> dict[str, Path]:
    """A tiny model trained on MOB1-3 with ``--fov-um``, and its bank of MOB1-3."""
    from helpers.data import shared_path

    data = shared_path("stutility-mob")
    folder = tmp_path_factory.mktemp("mob")
    res = mclx("train", "--data", data, "--sections", "MOB1,MOB2,MOB3", "--encoder",
               "tiny_cnn", "--encoder-weights", "none", "--freeze-encoder", "--epochs", 1,
               "--n-hvg", 30, "--fov-um", MOB_FOV_UM, "-q", "--out", folder / "m.pt")  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = mclx("bank", "build", "--ckpt", folder / "m.pt", "--data", data, "--sections",
               "MOB1,MOB2,MOB3", "--out", folder / "bank.npz")  # fmt: skip
    assert res.returncode == 0, res.stderr
    return {"data": data, "model": folder / "m.pt", "bank": folder / "bank.npz"}


@needs("stutility-mob")
def test_fov_um_is_the_checkpoint_s_field_of_view(mob):
    import torch

    ck = torch.load(mob["model"], weights_only=True)
    pre = ck["preprocess"]
    assert pre["mpp"] * pre["patch_size"] == pytest.approx(MOB_FOV_UM)
    assert ck["provenance"]["fov_um"] == MOB_FOV_UM


@needs("stutility-mob")
def test_mob_spots_are_drawn_at_their_real_size(mob, tmp_path):
    """scanpy's spot_diameter_fullres and QuPath's circles are the 100 µm spot, smaller
    than the spot pitch; the tile (the model's field of view) is another size."""
    out, geo = tmp_path / "m4.h5ad", tmp_path / "m4.geojson"
    res = mclx("infer", mob["data"] / "MOB4.jpg", "--spots",
               mob["data"] / "alignment_table_MOB4.tsv", "--bank", mob["bank"], "--out", out,
               "--geojson", geo, "--plot", _first_gene(mob), "-q")  # fmt: skip
    assert res.returncode == 0, res.stderr
    pred = ad.read_h5ad(out)
    u = pred.uns["mclx"]
    (lib,) = pred.uns["spatial"].values()
    diameter = lib["scalefactors"]["spot_diameter_fullres"]
    assert diameter == pytest.approx(100.0 / u["slide_mpp"])
    xy = pred.obsm["spatial"]
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    pitch = float(np.median(d.min(1)))  # nearest spots, 141 µm on the 2k array
    assert diameter < 0.85 * pitch < pitch < u["tile_size_level0"]
    assert u["tile_size_level0"] == round(MOB_FOV_UM / u["slide_mpp"])
    ring = np.array(json.loads(geo.read_text())["features"][0]["geometry"]["coordinates"][0])
    span = ring[:, 0].max() - ring[:, 0].min()
    assert span == pytest.approx(diameter, rel=0.01)
    _scanpy_draws_spots_of(pred, diameter * lib["scalefactors"]["tissue_hires_scalef"])


def _scanpy_draws_spots_of(pred, diameter: float) -> None:
    """``sc.pl.spatial`` draws one circle of ``diameter`` (hires px) per spot."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    with warnings.catch_warnings():  # scanpy 1.11 points to squidpy; the call still works
        warnings.simplefilter("ignore", FutureWarning)
        (ax,) = sc.pl.spatial(pred, color=pred.var_names[0], show=False)
    (spots,) = ax.collections
    widths = [p.vertices[:, 0].max() - p.vertices[:, 0].min() for p in spots.get_paths()]
    np.testing.assert_allclose(widths, diameter, rtol=1e-3)
    matplotlib.pyplot.close(ax.figure)


def _first_gene(mob) -> str:
    with np.load(mob["bank"], allow_pickle=False) as z:
        return str(z["genes"][0])


@needs("stutility-mob")
def test_mob_whole_slide_tiles_the_tissue_at_the_field_of_view(mob, tmp_path):
    """MOB4 at its 4.38 µm/px: tiles of the model's field of view over the tissue (the
    1 mm field of a 224 px patch gave 6 tiles)."""
    out = tmp_path / "w.h5ad"
    res = mclx("infer", mob["data"] / "MOB4.jpg", "--mpp", 4.38, "--bank", mob["bank"],
               "--out", out, "-q")  # fmt: skip
    assert res.returncode == 0, res.stderr
    pred = ad.read_h5ad(out)
    assert pred.uns["mclx"]["tile_size_level0"] == round(MOB_FOV_UM / 4.38)
    assert pred.n_obs > 150  # the 403 spots under tissue are 141 µm apart


# --------------------------------------------------------------------------- gene panel


def test_markers_are_appended_to_the_panel(tiny_bank, tmp_path):
    """--markers adds the genes a given list lacks (once, after it), recorded."""
    import torch
    from helpers.models import tiny_train_args

    genes = tmp_path / "ten.txt"
    genes.write_text("".join(f"GENE{i:03d}\n" for i in range(10)))
    out = tmp_path / "m.pt"
    args = tiny_train_args(tiny_bank["data"], out, "--genes", genes, "--epochs", 1,
                           "--markers", "GENE020,GENE000", genes_file=None)  # fmt: skip
    res = mclx(*args)
    assert res.returncode == 0, res.stderr
    ck = torch.load(out, weights_only=True)
    assert list(ck["preprocess"]["genes"]) == [f"GENE{i:03d}" for i in range(10)] + ["GENE020"]
    assert ck["provenance"]["markers"] == ["GENE020", "GENE000"]


def test_a_marker_the_data_lacks_is_refused_in_one_line(tiny_bank, tmp_path):
    from helpers.models import tiny_train_args

    out = tmp_path / "m.pt"
    res = mclx(*tiny_train_args(tiny_bank["data"], out, "--markers", "GENE001,ERBB2"))
    assert_one_line_error(res, "--markers ERBB2 not measured in section S1", "GENE000")
    assert not out.exists()


# --------------------------------------------------------------------------- gene names


@needs("stutility-mob")
def test_legacy_st_genes_take_the_symbols_of_a_feature_file(tmp_path):
    """A features.tsv beside the counts: symbols are the names, IDs in var["gene_ids"]."""
    from helpers.data import shared_path

    from mclx.data.readers import open_data

    src = shared_path("stutility-mob")
    for name in ("MOB1.tsv", "alignment_table_MOB1.tsv", "MOB1.jpg"):
        shutil.copy(src / name, tmp_path / name)
    ids = (src / "MOB1.tsv").read_text().splitlines()[0].split("\t")[1:4]
    (tmp_path / "features.tsv").write_text(
        f"{ids[0]}\tMbp\tGene Expression\n{ids[1]}\tPlp1\tGene Expression\n"
        f"{ids[2].split('.')[0]}\tMbp\tGene Expression\n"  # unversioned, a repeated symbol
    )
    a = open_data(tmp_path).read_section("MOB1")
    assert list(a.var_names[:3]) == ["Mbp", "Plp1", "Mbp-1"]
    assert list(a.var["gene_ids"][:3]) == ids
    assert a.var_names.is_unique


@needs("stutility-mob")
def test_plot_takes_an_ensembl_id_without_its_version(mob, tmp_path):
    gene = _first_gene(mob)
    bare = gene.split(".")[0]
    out = tmp_path / "m4.h5ad"
    res = mclx("infer", mob["data"] / "MOB4.jpg", "--spots",
               mob["data"] / "alignment_table_MOB4.tsv", "--bank", mob["bank"], "--out", out,
               "--plot", bare, "-q")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (tmp_path / f"m4.{bare}.png").is_file()


@needs("stutility-mob")
def test_plot_of_a_symbol_on_ensembl_ids_says_how_genes_are_named(mob, tmp_path):
    out = tmp_path / "m4.h5ad"
    res = mclx("infer", mob["data"] / "MOB4.jpg", "--bank", mob["bank"], "--mpp", 4.38,
               "--out", out, "--plot", "Mbp", "-q")  # fmt: skip
    assert_one_line_error(res, "--plot: genes not in the bank", "Mbp", "Ensembl IDs",
                          "features.tsv")  # fmt: skip
    assert not out.exists()


@needs("stutility-mob")
def test_the_tissue_mask_keeps_the_pale_tissue_of_legacy_st_images():
    """The spots STUtility's spot detector put under tissue lie in the mask: 4 of 5 over
    MOB1-4 (the palest lavender tissue, OD ~0.08, fell under the 0.1 floor: 3 of 5)."""
    import pandas as pd
    from helpers.data import shared_path

    from mclx.data.slide import open_slide
    from mclx.wsi.tiling import tissue_mask

    data, inside = shared_path("stutility-mob"), []
    for name in ("MOB1", "MOB2", "MOB3", "MOB4"):
        slide = open_slide(data / f"{name}.jpg")
        thumb, f = slide.thumbnail(2048)
        mask = tissue_mask(thumb)
        table = pd.read_csv(data / f"alignment_table_{name}.tsv", sep="\t")
        xy = np.floor(table[table["selected"] == 1][["pixel_x", "pixel_y"]].to_numpy() / f)
        inside.append(mask[xy[:, 1].astype(int), xy[:, 0].astype(int)].mean())
        assert mask.mean() < 0.15, name  # the glass stays glass
    assert np.mean(inside) > 0.75, inside


@needs("stutility-mob", "openseadragon")
def test_mclx_view_draws_mob_spots_at_their_real_size(mob, tmp_path):
    import re

    out = tmp_path / "m4.h5ad"
    res = mclx("infer", mob["data"] / "MOB4.jpg", "--spots",
               mob["data"] / "alignment_table_MOB4.tsv", "--bank", mob["bank"], "--out", out,
               "-q")  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = mclx("view", out, "--out", tmp_path / "view", "-q")
    assert res.returncode == 0, res.stderr
    html = (tmp_path / "view" / "index.html").read_text()
    m = re.search(r'<script id="mclx-data" type="application/json">(.*?)</script>', html, re.S)
    data = json.loads(m.group(1))
    u = ad.read_h5ad(out).uns["mclx"]
    assert data["shape"] == "circle"
    assert data["size"] == pytest.approx(100.0 / u["slide_mpp"]) != u["tile_size_level0"]
