"""Figures of ``mclx analyze``: PNGs with titles, colour bars and gene names, written
atomically (matplotlib's Agg backend)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from mclx.files import atomic_path


def _save(path: Path, draw: Callable, figsize: tuple[float, float]) -> Path:
    """Draw on a new figure, write it as PNG at ``path`` atomically, always close it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize, dpi=110)
    try:
        draw(fig)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _spots(ax, xy: np.ndarray, values, *, cmap: str = "viridis", **kw):
    """Spots as a scatter in image orientation (y down), equal aspect, no axes."""
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=kw.pop("s", 14), cmap=cmap, **kw)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    return sc


def top_genes_figure(
    path: Path, section: str, xy: np.ndarray, genes: list[str], measured, predicted, pcc
) -> Path:
    """Measured beside predicted maps of ``genes`` (rows) in one section."""

    def draw(fig):
        axes = fig.subplots(len(genes), 2, squeeze=False)
        for i, g in enumerate(genes):
            for j, (what, vals) in enumerate((("measured", measured), ("predicted", predicted))):
                ax = axes[i, j]
                sc = _spots(ax, xy, vals[:, i], cmap="magma")
                ax.set_title(f"{g}: {what}" + (f" (r = {pcc[i]:.2f})" if j else ""))
                fig.colorbar(sc, ax=ax, fraction=0.046, label="log-normalised expression")
        fig.suptitle(f"Section {section}: top genes by mean -log10(p) over sections")

    return _save(path, draw, (9.0, 3.8 * len(genes)))


def gene_gene_figure(path: Path, section: str, gg, max_labels: int = 60) -> Path:
    """Measured and predicted gene-gene correlation heatmaps, the measured clustering's
    order in both, with the preservation number in the title."""

    def draw(fig):
        axes = fig.subplots(1, 2, gridspec_kw={"wspace": 0.4})
        pairs = (("measured", gg.measured), ("predicted", gg.predicted))
        for ax, (what, mat) in zip(axes, pairs):
            im = ax.imshow(mat, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_title(f"{what} gene-gene correlation")
            ticks = np.arange(len(gg.genes)) if len(gg.genes) <= max_labels else []
            ax.set_xticks(ticks, [gg.genes[t] for t in ticks], rotation=90, fontsize=6)
            ax.set_yticks(ticks, [gg.genes[t] for t in ticks], fontsize=6)
            fig.colorbar(im, ax=ax, fraction=0.046, label="Pearson r")
        fig.suptitle(
            f"Section {section}: {len(gg.genes)} genes, clustered on the measured matrix; "
            f"upper triangles correlate at r = {gg.preservation:.3f}"
        )

    return _save(path, draw, (18.0, 8.0))


def domains_figure(path: Path, section: str, xy: np.ndarray, dom) -> Path:
    """Spatial domains (KMeans on predicted expression) beside the pathologist labels."""
    with_labels = dom.labels is not None and dom.n_labelled > 0

    def draw(fig):
        axes = fig.subplots(1, 2 if with_labels else 1, squeeze=False)[0]
        _categorical(axes[0], xy, dom.domains.astype(str), "domain")
        axes[0].set_title(f"{dom.k} domains: PCA + KMeans on predicted expression")
        if with_labels:
            _categorical(axes[1], xy, dom.labels.astype(str), "label")
            axes[1].set_title(f"pathologist labels (ARI {dom.ari:.3f}, NMI {dom.nmi:.3f})")
        fig.suptitle(f"Section {section}: spatial domains")

    return _save(path, draw, (14.0 if with_labels else 7.5, 6.5))


def _categorical(ax, xy: np.ndarray, values: np.ndarray, title: str) -> None:
    import matplotlib

    cats = sorted(set(values.tolist()))
    cmap = matplotlib.colormaps["tab20"]
    for i, c in enumerate(cats):
        sel = values == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=14, color=cmap(i % 20), label=c)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(title=title, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
