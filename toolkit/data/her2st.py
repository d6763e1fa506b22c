"""Reader for the her2st layout (github.com/almaan/her2st).

Each section becomes one AnnData:

- ``X``: raw UMI counts (CSR, float32), ``var_names`` the genes of the counts file;
- ``obs``: ``x``, ``y`` (integer array coordinates), ``pixel_x``, ``pixel_y``, ``section``
  and, for sections with pathologist labels (``ST-pat/lbl/{section}_labeled_coordinates.tsv``),
  ``label`` (None for unlabelled spots); ``obs_names`` are ``"{section}_{x}x{y}"``;
- ``obsm["spatial"]``: spot centres in full-resolution image pixels (x, y);
- ``uns``: ``section``, ``layout``, ``array`` (``1k``), ``image_path`` (None when the
  section has no image), ``mpp`` (µm/px estimated from the spot grid: legacy ST spots are
  200 µm apart, :mod:`mclx.data.arrays`) and the source files.

Counts and spot files are joined on ``"{x}x{y}"`` and only ``selected == 1`` spots kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from mclx.data.arrays import st_grid_mpp
from mclx.data.layout import Reader, check_inside, register
from mclx.data.spotfiles import READ_ERRORS, read_selection
from mclx.errors import DataError, short

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
GENE_LIST_NAME = "her_hvg_cut_1000.npy"  # the 785-gene list of mclSTExp / Hist2ST / HisToGene


def find_data_root(path: str | os.PathLike) -> Path:
    """Return the folder that holds ``ST-cnts``: ``path`` itself or ``path/data``."""
    path = Path(path)
    if not path.exists():
        msg = f"{path}: data folder does not exist"
        raise FileNotFoundError(msg)
    for cand in (path, path / "data"):
        if (cand / "ST-cnts").is_dir():
            return cand
    msg = f"{path}: not a her2st data folder (no ST-cnts/ in it or in data/)"
    raise FileNotFoundError(msg)


def list_sections(root: str | os.PathLike, *, with_image: bool = False) -> list[str]:
    """Section names that have a counts file (and an image when ``with_image``)."""
    root = find_data_root(root)
    names = sorted(p.name.split(".")[0] for p in (root / "ST-cnts").glob("*.tsv*"))
    if with_image:
        names = [s for s in names if _image_path(root, s) is not None]
    return names


def _image_path(root: Path, section: str) -> Path | None:
    folder = root / "ST-imgs" / section[0] / section
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return files[0] if files else None


def _counts_path(root: Path, section: str) -> Path:
    for name in (f"{section}.tsv.gz", f"{section}.tsv"):
        if (root / "ST-cnts" / name).is_file():
            return root / "ST-cnts" / name
    known = list_sections(root)
    msg = f"{root / 'ST-cnts'}: no counts file for section {section!r} (known: {', '.join(known)})"
    raise FileNotFoundError(msg)


def read_counts(path: Path) -> pd.DataFrame:
    """Spots x genes counts table, validated (finite, non-negative, unique spots)."""
    try:
        df = pd.read_csv(path, sep="\t", index_col=0)
    except READ_ERRORS as exc:
        msg = f"{path}: cannot read counts table ({short(exc)})"
        raise DataError(msg) from exc
    if df.shape[0] == 0 or df.shape[1] == 0:
        msg = f"{path}: counts table is empty"
        raise DataError(msg)
    try:
        values = df.to_numpy(dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        numeric = df.apply(pd.to_numeric, errors="coerce")  # slow: only to say where
        bad = (numeric.isna() & df.notna()).to_numpy()
        where = _where(df, bad) if bad.any() else ""
        msg = f"{path}: counts table has non-numeric values{where}"
        raise DataError(msg) from exc
    for problem, bad in (
        ("NaN (missing) values", np.isnan(values)),
        ("infinite values", np.isinf(values)),
        ("negative values", values < 0),
    ):
        if bad.any():
            msg = f"{path}: counts contain {problem}{_where(df, bad)}"
            raise DataError(msg)
    df.index = df.index.astype(str)
    dup = df.index[df.index.duplicated()]
    if len(dup):
        msg = f"{path}: duplicate spots {list(dup[:5])}"
        raise DataError(msg)
    df.columns = df.columns.astype(str)
    if df.columns.duplicated().any():
        msg = f"{path}: duplicate gene columns {list(df.columns[df.columns.duplicated()][:5])}"
        raise DataError(msg)
    return df


def _where(df: pd.DataFrame, bad: np.ndarray) -> str:
    """Where a boolean mask over ``df`` is set: " (N cells; first: spot S, gene G = 'v')"."""
    r, c = np.argwhere(bad)[0]
    n = int(bad.sum())
    return (
        f" ({n} cell{'s' * (n != 1)}; first: spot {df.index[r]}, gene {df.columns[c]} "
        f"= {str(df.iat[r, c])[:20]!r})"
    )


def array_extent(root: str | os.PathLike) -> tuple[int, int]:
    """Largest array coordinates (x, y) + 1 over every spot file of the folder: sizes the
    positional tables so that any section of the folder can later join a bank."""
    root = find_data_root(root)
    xs, ys = [0], [0]
    for s in list_sections(root):
        path = root / "ST-spotfiles" / f"{s}_selection.tsv"
        if path.is_file():
            spots = read_selection(path)
            xs.append(int(spots["x"].max()))
            ys.append(int(spots["y"].max()))
    return max(xs) + 1, max(ys) + 1


def read_section(root: str | os.PathLike, section: str):
    """Read one section as AnnData (see module docstring)."""
    return Her2stReader(find_data_root(root)).read_section(section)


def st_section(
    section: str,
    counts_path: Path,
    spots_path: Path,
    image: Path | None,
    *,
    labels: Path | None = None,
):
    """A legacy ST section (her2st or STUtility files) as AnnData: counts joined with the
    selected spots of the spot file on ``"{x}x{y}"``, checked against the image."""
    import anndata as ad
    import scipy.sparse as sp

    if not spots_path.is_file():
        msg = f"{spots_path}: spot file for section {section!r} does not exist"
        raise FileNotFoundError(msg)
    counts = read_counts(counts_path)
    spots = read_selection(spots_path)
    common = counts.index.intersection(spots.index, sort=False)
    if len(common) == 0:
        msg = f"{counts_path}: no spot in common with {spots_path}"
        raise DataError(msg)
    counts, spots = counts.loc[common], spots.loc[common]
    obs = pd.DataFrame(
        {
            "x": spots["x"].to_numpy(),
            "y": spots["y"].to_numpy(),
            "pixel_x": spots["pixel_x"].to_numpy(float),
            "pixel_y": spots["pixel_y"].to_numpy(float),
            "section": section,
        },
        index=[f"{section}_{i}" for i in common],
    )
    if labels is not None:
        obs["label"] = read_labels(labels).reindex(list(common)).to_numpy(dtype=object)
    if image is not None:
        check_inside(image, obs)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts.to_numpy(dtype=np.float32)),
        obs=obs,
        var=pd.DataFrame(index=counts.columns.astype(str)),
    )
    adata.obsm["spatial"] = obs[["pixel_x", "pixel_y"]].to_numpy(float)
    return adata


def read_labels(path: Path) -> pd.Series:
    """Pathologist labels of a ``*_labeled_coordinates.tsv`` file, indexed ``"{x}x{y}"``
    (its x, y are the spot-detector's adjusted array coordinates: rounded here). Rows
    whose coordinates are NA (a labelled spot the detector did not place: F1 has one,
    G2 eight) name no spot and are left out."""
    try:
        df = pd.read_csv(path, sep="\t")
        df = df[np.isfinite(pd.to_numeric(df["x"])) & np.isfinite(pd.to_numeric(df["y"]))]
        x = np.rint(pd.to_numeric(df["x"])).astype(np.int64)
        y = np.rint(pd.to_numeric(df["y"])).astype(np.int64)
        labels = df["label"].astype(str).to_numpy()
    except (*READ_ERRORS, KeyError) as exc:
        msg = f"{path}: cannot read labels (need columns x, y, label; {short(exc)})"
        raise DataError(msg) from exc
    out = pd.Series(labels, index=[f"{a}x{b}" for a, b in zip(x, y)], dtype=object)
    if out.index.duplicated().any():
        msg = f"{path}: two labels for spot {out.index[out.index.duplicated()][0]}"
        raise DataError(msg)
    return out


@register
class Her2stReader(Reader):
    """The her2st layout (github.com/almaan/her2st): see the module docstring."""

    name = "her2st"
    looks_for = "ST-cnts/ and ST-spotfiles/ in DIR or DIR/data"

    @classmethod
    def find(cls, path: Path) -> Path | None:
        for cand in (path, path / "data"):
            if (cand / "ST-cnts").is_dir():
                return cand
        return None

    def _all_sections(self) -> list[str]:
        return list_sections(self.root)

    def image_path(self, section: str) -> Path | None:
        return _image_path(self.root, section)

    def gene_file(self) -> Path | None:
        for folder in (self.root, self.root.parent):
            if (folder / GENE_LIST_NAME).is_file():
                return folder / GENE_LIST_NAME
        return None

    def extent(self) -> tuple[int, int]:
        return array_extent(self.root)

    def read_section(self, section: str):
        counts_path = _counts_path(self.root, section)
        spots_path = self.root / "ST-spotfiles" / f"{section}_selection.tsv"
        labels = self.root / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv"
        image = self.image_path(section)
        adata = st_section(
            section, counts_path, spots_path, image, labels=labels if labels.is_file() else None
        )
        return self.finish(
            adata,
            section,
            array="1k",
            image=image,
            mpp=self.full_mpp(st_grid_mpp(adata.obs, "1k")),
            counts_path=counts_path,
            spots_path=spots_path,
        )


def read_her2st(
    root: str | os.PathLike, sections: list[str] | None = None, *, with_image: bool = False
) -> dict[str, object]:
    """Read several sections (all, or those with an image) into ``{name: AnnData}``."""
    return Her2stReader(find_data_root(root)).read(sections, with_image=with_image)
