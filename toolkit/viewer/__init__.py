"""``mclx view``: predictions over their slide, in a folder any browser opens.

The folder holds ``index.html`` (the predictions inlined as data, the slide's Deep Zoom
layout inline too: a page opened from disk may not fetch files with scripts),
``view.js`` / ``view.css`` (the page's code, package data in ``static/``),
``openseadragon/`` (the pinned OpenSeadragon, :mod:`mclx.viewer.openseadragon`),
``slide.dzi`` + ``slide_files/`` (the pyramid, :mod:`mclx.viewer.deepzoom`) and
``mclx-view.json`` (what was shown; marks the folder as a view that a later run may
replace). It is written beside its destination and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MARKER = "mclx-view.json"


def _slide_for(adata, source: Path, slide: str | os.PathLike | None) -> Path:
    """The slide given, else the one the predictions were made on."""
    if slide is not None:
        return Path(slide)
    recorded = Path(str(adata.uns["mclx"].get("slide", "")))
    if not str(recorded) or not recorded.exists():
        msg = f"{source}: its slide {recorded} does not exist (moved?); pass --slide"
        raise FileNotFoundError(msg)
    return recorded


def _check_extent(adata, slide, source: Path, *, force: bool = False) -> None:
    """The slide must be the one the predictions recorded (size and thumbnail), unless
    ``force``; tile centres must lie on it (else it is not the slide they came from)."""
    from mclx.data.slide import slide_mismatch
    from mclx.errors import DataError

    why = None if force else slide_mismatch(dict(adata.uns["mclx"]), slide)
    if why is not None:
        msg = f"{slide.path}: not the slide {source} was made on: {why} (--force draws it anyway)"
        raise DataError(msg)

    W, H = slide.dimensions
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if len(xy) and (xy.min() < 0 or xy[:, 0].max() > W or xy[:, 1].max() > H):
        msg = (
            f"{slide.path}: {W} x {H} px, but {source} has tiles centred up to "
            f"({xy[:, 0].max():.0f}, {xy[:, 1].max():.0f}): not the slide they were made on?"
        )
        raise DataError(msg)


def write_view(
    predictions: str | os.PathLike,
    out: str | os.PathLike,
    *,
    slide: str | os.PathLike | None = None,
    gene: str | None = None,
    genes: Sequence[str] = (),
    workers: int = 2,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Write the viewer folder ``out`` for ``predictions`` (.h5ad); return its summary.

    Args:
        slide: the slide image (default: the path recorded in ``uns["mclx"]["slide"]``).
        gene: the gene coloured first (default: the one that varies most).
        genes: the genes in the page (default: all, up to ``page.MAX_VALUES`` values).
        workers: threads writing pyramid tiles.
        force: draw over ``slide`` even when it is not the slide the predictions
            recorded (another size or picture).
    """
    from mclx.data.slide import open_slide
    from mclx.files import atomic_folder, check_output_folder
    from mclx.viewer import openseadragon, page
    from mclx.viewer.deepzoom import write_pyramid
    from mclx.wsi.writer import read_predictions

    out = check_output_folder(out, marker=MARKER, what="an mclx view")
    osd = openseadragon.find()  # before any work: says how to get it
    source = Path(predictions)
    adata = read_predictions(source)
    chosen = page.choose_genes(adata, str(source), genes)
    if gene is not None and gene not in adata.var_names:
        msg = f"{source}: --gene {gene} is not in the predictions"
        raise KeyError(msg)
    slide_path = _slide_for(adata, source, slide)
    sl = open_slide(slide_path)
    try:
        _check_extent(adata, sl, source, force=force)
        meta = page.header(adata.uns["mclx"], source.resolve(), slide_path.resolve())
        with atomic_folder(out) as tmp:
            dzi = write_pyramid(sl, tmp, workers=workers, progress=progress)
            data = page.page_data(adata, dzi, genes=chosen, gene=gene, meta=meta)
            (tmp / "index.html").write_text(page.render(data, f"mclx: {slide_path.name}"))
            for name, content in page.static_files():
                (tmp / name).write_bytes(content)
            shutil.copytree(osd, tmp / "openseadragon")
            summary = _summary(adata, data, source, slide_path, openseadragon.version_of(osd))
            (tmp / MARKER).write_text(json.dumps(summary, indent=1))
    finally:
        sl.close()
    return summary


def _summary(adata, data: dict, source: Path, slide: Path, osd_version: str) -> dict:
    size = data["dzi"]["Image"]["Size"]
    return {
        "predictions": str(source.resolve()),
        "slide": str(slide.resolve()),
        "n_obs": int(adata.n_obs),
        "n_genes": len(data["genes"]),
        "gene": data["gene"],
        "slide_size": [int(size["Width"]), int(size["Height"])],
        "openseadragon": osd_version,
    }
