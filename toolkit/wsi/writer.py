"""Prediction outputs: the ``.h5ad`` file (in scanpy's spatial layout) and per-gene PNG
maps, written atomically; and reading predictions back, checked."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mclx.files import atomic_path


def write_predictions(adata, out: str | os.PathLike) -> float:
    """Write ``adata`` to ``out``; record the seconds it took in ``uns/mclx/timings/write``.

    The ``.h5ad`` is encoded in memory and written with one Python write: a full disk
    then fails with one clean ``OSError`` (HDF5 writing to disk itself reports a failed
    write many times over, on stderr, as its objects are freed).
    """
    import h5py

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    out = Path(out)
    t0 = time.perf_counter()
    adata.uns["mclx"]["timings"]["write"] = 0.0  # a float64 scalar, patched in place below
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        write_elem(f, "/", adata)
        seconds = time.perf_counter() - t0
        f["uns/mclx/timings/write"][()] = seconds
    adata.uns["mclx"]["timings"]["write"] = seconds
    with atomic_path(out, suffix=".h5ad") as tmp, open(tmp, "wb") as fh:
        fh.write(buf.getbuffer())
    return seconds


HIRES_SIDE = 2000  # px, the longer side of uns["spatial"][...]["images"]["hires"] (as Visium's)


def library_id(slide_path: str | os.PathLike) -> str:
    """The key of the slide in ``uns["spatial"]``: its file (or DICOM folder) name stem,
    in letters, digits, ``_``, ``-`` and ``.`` (what SpatialData accepts as a name)."""
    import re

    path = Path(slide_path)
    stem = path.parent.name if path.name == "outs" else path.stem  # Space Ranger's outs/
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "slide"


def add_spatial_image(
    adata,
    slide_path: str | os.PathLike,
    *,
    mpp: float | None = None,
    max_side: int = HIRES_SIDE,
    slide=None,
) -> None:
    """Put the slide in ``uns["spatial"]`` as scanpy, squidpy and HEST expect it, so that
    ``sc.pl.spatial(adata, color=GENE)`` draws the predictions over it as they are:
    ``uns["spatial"][library_id]`` holds ``images["hires"]`` (RGB uint8, longer side
    ``max_side``), ``scalefactors`` (``tissue_hires_scalef`` = hires px per level-0 px,
    ``spot_diameter_fullres`` = a spot's real diameter in level-0 px for predictions at
    spots, the tile side for a tissue grid) and ``metadata``. ``slide``:
    the slide already open (else it is opened here)."""
    from mclx.data.slide import open_slide

    if slide is not None:
        thumb, f = slide.thumbnail(max_side)
    else:
        opened = open_slide(slide_path, mpp=mpp)
        try:
            thumb, f = opened.thumbnail(max_side)
        finally:
            opened.close()
    adata.uns["spatial"] = {
        library_id(slide_path): {
            "images": {"hires": np.ascontiguousarray(thumb, dtype=np.uint8)},
            "scalefactors": {
                "tissue_hires_scalef": float(1.0 / f),
                "spot_diameter_fullres": spot_diameter(adata),
            },
            "metadata": {"source_image_path": str(Path(slide_path).resolve())},
        }
    }


def spot_diameter(adata) -> float:
    """What a tile or spot of ``adata`` is drawn as, in level-0 px: a spot's real
    diameter (``uns["mclx"]["spot_diameter_level0"]``), else the tile side (a tissue grid,
    or predictions of an mclx that did not record it)."""
    u = adata.uns["mclx"]
    return float(u.get("spot_diameter_level0", u["tile_size_level0"]))


def at_spots(adata) -> bool:
    """Whether the predictions are at given spots (drawn as circles), not a tile grid."""
    return str(adata.uns["mclx"].get("tiles_from", "")).startswith("spots")


def hires_image(adata) -> tuple[np.ndarray, float] | None:
    """The slide image of ``uns["spatial"]`` and its level-0 px per image px, if any."""
    spatial = adata.uns.get("spatial") or {}
    for lib in spatial.values():
        img = lib.get("images", {}).get("hires")
        scale = lib.get("scalefactors", {}).get("tissue_hires_scalef")
        if img is not None and scale:
            return np.asarray(img), 1.0 / float(scale)
    return None


def read_predictions(path: str | os.PathLike):
    """mclx predictions (``.h5ad``) back as AnnData; refuses a file that is not one."""
    from mclx.artifacts import describe_file, require_file
    from mclx.errors import DataError

    path = require_file(Path(path), "predictions", nonempty=True, error=DataError)
    import anndata as ad

    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py / anndata raise many types for a wrong file
        msg = f"{path}: cannot read it as .h5ad predictions (the file is {describe_file(path)})"
        raise DataError(msg) from exc
    u = adata.uns.get("mclx")
    if not isinstance(u, dict) or "spatial" not in adata.obsm or "tile_size_level0" not in u:
        msg = (
            f"{path}: not mclx predictions (no uns['mclx'] with tile_size_level0, or no "
            "obsm['spatial'])"
        )
        raise DataError(msg)
    return adata


def plot_genes(
    adata,
    slide_path: str | os.PathLike,
    genes: Sequence[str],
    out_prefix: str | os.PathLike,
    *,
    mpp: float | None = None,
) -> list[Path]:
    """One PNG per gene: predicted expression over the slide thumbnail."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mclx.data.genenames import missing_hint, resolve_gene
    from mclx.data.slide import open_slide

    ids = adata.var["gene_ids"] if "gene_ids" in adata.var else None
    columns = {g: resolve_gene(g, adata.var_names, ids) for g in genes}
    missing = [g for g, col in columns.items() if col is None]
    if missing:
        msg = f"--plot: genes not in the bank: {', '.join(missing[:5])}" + missing_hint(
            adata.var_names
        )
        raise KeyError(msg)
    found = hires_image(adata)  # the image uns["spatial"] holds, else read again
    if found is None:
        slide = open_slide(slide_path, mpp=mpp)
        try:
            found = slide.thumbnail(1600)
        finally:
            slide.close()
    thumb, f = found
    xy = np.asarray(adata.obsm["spatial"]) / f
    size = float(adata.uns["mclx"]["tile_size_level0"]) / f
    paths = []
    for g in genes:
        vals = np.asarray(adata[:, columns[g]].X).ravel()
        fig, ax = plt.subplots(figsize=(8, 8 * thumb.shape[0] / thumb.shape[1]), dpi=110)
        try:  # closed even when drawing or writing fails (a full disk, say)
            ax.imshow(thumb)
            if at_spots(adata):  # spots at their real size, in the image's pixels
                sc = _spot_circles(ax, xy, vals, spot_diameter(adata) / f)
            else:
                sc = ax.scatter(xy[:, 0], xy[:, 1], c=vals, s=max(4.0, (0.8 * size) ** 2 / 4),
                                marker="s", cmap="magma", alpha=0.75, linewidths=0)  # fmt: skip
            fig.colorbar(sc, ax=ax, fraction=0.035, label=f"{g} (predicted, log-normalised)")
            ax.set_axis_off()
            ax.set_title(f"{Path(slide_path).name}: {g}")
            path = Path(f"{out_prefix}.{g}.png")
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", bbox_inches="tight")
        finally:
            plt.close(fig)
        paths.append(path)
    return paths


def _spot_circles(ax, xy: np.ndarray, values: np.ndarray, diameter: float):
    """Circles of ``diameter`` (data units: the image's pixels) at ``xy``, coloured by
    ``values``; the collection, for the colour bar."""
    from matplotlib.collections import EllipseCollection

    d = np.full(len(xy), diameter)
    circles = EllipseCollection(d, d, np.zeros(len(xy)), units="xy", offsets=xy,
                                offset_transform=ax.transData, cmap="magma", alpha=0.85,
                                linewidths=0)  # fmt: skip
    circles.set_array(np.asarray(values, dtype=np.float64))
    ax.add_collection(circles)
    return circles
