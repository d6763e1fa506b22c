"""The her2st reader against an independent pandas read, and its bad-input errors."""

import gzip

import numpy as np
import pandas as pd
import pytest
from helpers import needs

from mclx.config import PreprocessCfg
from mclx.data import list_sections, load_gene_list, normalize_expression, read_section
from mclx.data.her2st import find_data_root, read_her2st
from mclx.errors import DataError


@needs("her2st")
def test_reader_matches_pandas(her2st):
    root = find_data_root(her2st)
    adata = read_section(her2st, "C2")
    counts = pd.read_csv(root / "ST-cnts" / "C2.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(root / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    spots = spots[spots.selected == 1]
    spots.index = spots.x.astype(str) + "x" + spots.y.astype(str)
    keep = [i for i in counts.index if i in spots.index]
    assert adata.n_obs == len(keep) == 187
    assert list(adata.obs_names) == [f"C2_{i}" for i in keep]
    np.testing.assert_array_equal(adata.X.toarray(), counts.loc[keep].to_numpy(np.float32))
    assert list(adata.var_names) == list(counts.columns)
    np.testing.assert_allclose(adata.obsm["spatial"], spots.loc[keep, ["pixel_x", "pixel_y"]])
    np.testing.assert_array_equal(adata.obs["x"], spots.loc[keep, "x"])
    assert adata.uns["image_path"].endswith(".jpg")
    assert 0.5 < adata.uns["mpp"] < 1.0  # legacy ST: 200 µm pitch over ~290 px


@needs("her2st")
def test_sections_and_images(her2st):
    assert len(list_sections(her2st)) == 35
    assert list_sections(her2st, with_image=True) == ["C2", "C3", "C4", "C5", "C6"]
    genes = load_gene_list(find_data_root(her2st).parent / "her_hvg_cut_1000.npy")
    assert len(genes) == 785
    a = read_section(her2st, "A1")  # counts and spots, no image
    assert a.uns["image_path"] is None and a.n_obs > 0
    with pytest.raises(KeyError, match="Z9"):
        read_her2st(her2st, ["Z9"])
    with pytest.raises(DataError, match="no image"):
        read_her2st(her2st, ["A1"], with_image=True)


def test_normalisation_matches_formula(synthetic):
    a = read_section(synthetic, "S1")
    genes = tuple(a.var_names[[3, 1, 10, 7]])
    for base, log in (("10", np.log10), ("e", np.log)):
        x = normalize_expression(a, PreprocessCfg(genes=genes, log_base=base))
        raw = a[:, list(genes)].X.toarray().astype(np.float64)
        lib = raw.sum(1, keepdims=True)
        expected = log(1 + np.divide(raw * 1e4, lib, out=np.zeros_like(raw), where=lib > 0))
        np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)


def test_missing_genes_name_the_counts_file(synthetic):
    a = read_section(synthetic, "S1")
    with pytest.raises(DataError, match=r"S1\.tsv\.gz.*2 of 3 genes.*NOPE1"):
        normalize_expression(a, PreprocessCfg(genes=("NOPE1", "GENE000", "NOPE2")))


def _copy(synthetic, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(synthetic, dst)
    return dst


def _rewrite_counts(root, section, edit):
    path = root / "data" / "ST-cnts" / f"{section}.tsv.gz"
    df = pd.read_csv(path, sep="\t", index_col=0)
    df = edit(df)
    with gzip.open(path, "wt") as fh:
        df.to_csv(fh, sep="\t")
    return path


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda df: df.assign(GENE001=np.nan), "NaN"),
        (lambda df: df.assign(GENE001=-1), "negative"),
        (lambda df: pd.concat([df, df.iloc[:1]]), "duplicate spots"),
        (lambda df: df.iloc[:0], "empty"),
    ],
)
def test_bad_counts(synthetic, tmp_path, edit, match):
    root = _copy(synthetic, tmp_path)
    path = _rewrite_counts(root, "S2", edit)
    with pytest.raises(DataError, match=match) as info:
        read_section(root, "S2")
    assert str(path) in str(info.value)


def test_truncated_counts_and_spots_outside(synthetic, tmp_path):
    root = _copy(synthetic, tmp_path)
    path = root / "data" / "ST-cnts" / "S1.tsv.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="S1.tsv.gz"):
        read_section(root, "S1")
    spots = root / "data" / "ST-spotfiles" / "S2_selection.tsv"
    df = pd.read_csv(spots, sep="\t")
    df.loc[0, "pixel_x"] = 1e6
    df.to_csv(spots, sep="\t", index=False)
    with pytest.raises(DataError, match="outside"):
        read_section(root, "S2")


def test_missing_folder():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_data_root("/no/such/folder")


@needs("her2st")
@pytest.mark.parametrize("section", ["F1", "G2"])
def test_labels_with_unplaced_spots_are_read_without_them(her2st, section):
    """The her2st label files of F1 and G2 hold rows whose x, y are NA (spots the
    detector did not place): they name no spot and are left out; every other row is
    kept with its label (against a plain pandas read)."""
    from mclx.data.her2st import read_labels

    path = find_data_root(her2st) / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv"
    raw = pd.read_csv(path, sep="\t")
    placed = raw.dropna(subset=["x", "y"])
    assert len(placed) < len(raw)  # the data does have such rows
    labels = read_labels(path)
    want = {f"{round(x)}x{round(y)}": lab for x, y, lab in placed[["x", "y", "label"]].values}
    assert labels.to_dict() == want
    adata = read_section(her2st, section)  # what bank build and the demo read
    assert adata.obs["label"].notna().sum() > 0
