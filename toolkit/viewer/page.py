"""The viewer page: the predictions as data inlined in ``index.html``, read by ``view.js``.

Numbers travel as base64 of little-endian float32 (the predictions' own precision), so
the page shows the values of the ``.h5ad``; the colour map is a 256-entry table from
matplotlib, applied in the page as ``index = min(255, floor(256 (v - min) / (max - min)))``
over the gene's range on the slide.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

CMAP = "viridis"
MAX_VALUES = 32_000_000  # observations x genes inlined: 128 MB of float32 in the page
STATIC = ("view.js", "view.css")  # copied beside index.html
TIMINGS = ("total", "read", "encode", "retrieve", "write", "warmup", "compile")


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def colour_table(name: str = CMAP) -> list[str]:
    """The colour map as 256 ``#rrggbb`` strings."""
    from matplotlib import colormaps

    rgb = (np.asarray(colormaps[name](np.linspace(0, 1, 256)))[:, :3] * 255).round()
    return ["#" + "".join(f"{int(c):02x}" for c in row) for row in rgb]


def choose_genes(adata, source: str, genes: Sequence[str] = ()) -> list[str]:
    """The genes to put in the page: ``genes`` (all of them checked), or every gene when
    the page stays under :data:`MAX_VALUES` values."""
    from mclx.errors import DataError

    if genes:
        missing = [g for g in genes if g not in adata.var_names]
        if missing:
            msg = f"{source}: --genes not in the predictions: {', '.join(missing[:5])}"
            raise KeyError(msg)
        return list(dict.fromkeys(genes))
    if adata.n_obs * adata.n_vars > MAX_VALUES:
        msg = (
            f"{source}: {adata.n_obs:,} observations x {adata.n_vars:,} genes is more than "
            f"{MAX_VALUES:,} values for one page; choose genes with --genes"
        )
        raise DataError(msg)
    return list(adata.var_names)


def default_gene(values: np.ndarray, genes: list[str]) -> str:
    """The gene shown first: the one whose prediction varies most over the slide."""
    return genes[int(np.argmax(values.var(axis=0)))] if len(genes) else ""


def header(u: dict, source: Path, slide: Path) -> dict:
    """What the page's header shows, from ``uns["mclx"]``."""
    t = u.get("timings", {})

    def text(key: str) -> str:
        return str(u.get(key, ""))

    return {
        "slide": str(slide),
        "predictions": str(source),
        "slide_vendor": text("slide_vendor"),
        "slide_mpp": float(u.get("slide_mpp", -1.0)),
        "checkpoint_fingerprint": text("checkpoint_fingerprint"),
        "bank": text("bank"),
        "backend": text("backend"),
        "precision": text("precision"),
        "device": text("device"),
        "k": text("k"),
        "distance": text("distance"),
        "tiles_from": text("tiles_from"),
        "mclx_version": text("mclx_version"),
        "timings": {key: float(t[key]) for key in TIMINGS if key in t},
    }


def page_data(adata, dzi: dict, *, genes: list[str], gene: str | None, meta: dict) -> dict:
    """Everything ``view.js`` needs, JSON-ready."""
    values = np.asarray(adata[:, genes].X, dtype=np.float32)
    if gene is not None and gene not in genes:
        msg = f"{meta['predictions']}: --gene {gene} is not among the page's genes"
        raise KeyError(msg)
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    u = adata.uns["mclx"]
    return {
        "meta": meta,
        "dzi": dzi,
        "n_obs": int(adata.n_obs),
        "ids": [str(i) for i in adata.obs_names],
        "x": _b64(xy[:, 0]),
        "y": _b64(xy[:, 1]),
        "shape": "circle" if _at_spots(u) else "square",
        # a spot at its real diameter (older predictions: the tile side), a tile as a tile
        "size": float(u.get("spot_diameter_level0", u["tile_size_level0"]))
        if _at_spots(u)
        else float(u["tile_size_level0"]),
        "genes": genes,
        "values": _b64(values),
        "gene": gene or default_gene(values, genes),
        "cmap": CMAP,
        "lut": colour_table(),
    }


def render(data: dict, title: str) -> str:
    """``index.html`` with ``data`` inlined (``</`` escaped so no string ends the script)."""
    template = resources.files("mclx.viewer").joinpath("static/index.html").read_text("utf-8")
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return template.replace("{{TITLE}}", html.escape(title)).replace("{{DATA}}", payload)


def static_files() -> list[tuple[str, bytes]]:
    """The page's script and style sheet, (name, bytes)."""
    root = resources.files("mclx.viewer").joinpath("static")
    return [(name, root.joinpath(name).read_bytes()) for name in STATIC]


def _at_spots(u) -> bool:
    """Whether the predictions (``uns["mclx"]`` ``u``) are at given spots."""
    return str(u.get("tiles_from", "")).startswith("spots")
