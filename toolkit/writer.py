"""Prediction outputs: the ``.h5ad`` file and per-gene PNG maps, written atomically."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mclx.io import atomic_path


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

    from mclx.slide import open_slide

    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        msg = f"--plot: genes not in the bank: {', '.join(missing[:5])}"
        raise KeyError(msg)
    slide = open_slide(slide_path, mpp=mpp)
    thumb, f = slide.thumbnail(1600)
    slide.close()
    xy = np.asarray(adata.obsm["spatial"]) / f
    size = float(adata.uns["mclx"]["tile_size_level0"]) / f
    paths = []
    for g in genes:
        vals = np.asarray(adata[:, g].X).ravel()
        fig, ax = plt.subplots(figsize=(8, 8 * thumb.shape[0] / thumb.shape[1]), dpi=110)
        try:  # closed even when drawing or writing fails (a full disk, say)
            ax.imshow(thumb)
            sc = ax.scatter(
                xy[:, 0],
                xy[:, 1],
                c=vals,
                s=max(4.0, (0.8 * size) ** 2 / 4),
                marker="s",
                cmap="magma",
                alpha=0.75,
                linewidths=0,
            )
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
