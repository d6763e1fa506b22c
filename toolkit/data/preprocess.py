"""Expression preprocessing: gene selection and normalisation, done with scanpy.

The reference code (mclSTExp, via scprep) restricts counts to the gene list, scales each
spot to a library size of 10,000 over those genes and takes log10(1 + x). That is the
default here; natural log is an option. The choice travels in :class:`PreprocessCfg`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from mclx.config import PreprocessCfg
from mclx.errors import DataError


def load_gene_list(path: str | os.PathLike) -> list[str]:
    """Genes from a ``.npy`` array of strings or a text file with one gene a line."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: gene list does not exist"
        raise FileNotFoundError(msg)
    try:
        if path.suffix == ".npy":
            genes = [str(g) for g in np.load(path, allow_pickle=False).ravel()]
        else:
            genes = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        msg = f"{path}: cannot read gene list ({exc})"
        raise DataError(msg) from exc
    if not genes:
        msg = f"{path}: gene list is empty"
        raise DataError(msg)
    if len(set(genes)) != len(genes):
        msg = f"{path}: gene list has duplicates"
        raise DataError(msg)
    return genes


def check_genes(adata, genes: Sequence[str]) -> None:
    """Raise :class:`DataError` naming the counts file when genes are missing."""
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        src = adata.uns.get("counts_path", adata.uns.get("section", "counts"))
        msg = (
            f"{src}: {len(missing)} of {len(genes)} genes are missing from the counts "
            f"(first: {', '.join(missing[:5])})"
        )
        raise DataError(msg)


def highly_variable_genes(
    adatas: Sequence, n_top: int = 1000, *, among: Collection[str] | None = None
) -> list[str]:
    """Top ``n_top`` highly variable genes across ``adatas`` (scanpy, ``seurat_v3`` on
    counts), computed on these sections' counts alone.

    Only genes present in every section (and in ``among``, when given) are considered;
    sections form the batches.
    """
    import anndata as ad
    import scanpy as sc

    common = set(adatas[0].var_names)
    for a in adatas[1:]:
        common &= set(a.var_names)
    if among is not None:
        common &= set(among)
    genes = [g for g in adatas[0].var_names if g in common]
    if not genes:
        msg = "no gene is measured in every section: cannot choose highly variable genes"
        raise DataError(msg)
    joined = ad.concat([a[:, genes] for a in adatas], label="batch", index_unique="-")
    n_top = min(n_top, len(genes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sc.pp.highly_variable_genes(
                joined, n_top_genes=n_top, flavor="seurat_v3", batch_key="batch"
            )
        except ImportError:  # seurat_v3 needs scikit-misc; fall back to scanpy's default
            sc.pp.normalize_total(joined, target_sum=1e4)
            sc.pp.log1p(joined)
            sc.pp.highly_variable_genes(joined, n_top_genes=n_top, batch_key="batch")
    hv = joined.var
    order = hv["highly_variable_rank"] if "highly_variable_rank" in hv else None
    chosen = hv.index[hv["highly_variable"]]
    if order is not None:
        chosen = order.loc[chosen].sort_values().index
    return [str(g) for g in chosen]


def normalize_expression(adata, cfg: PreprocessCfg) -> np.ndarray:
    """Counts restricted to ``cfg.genes`` -> library-size normalised -> log, float32.

    Spots whose counts over the genes sum to zero stay all-zero.
    """
    check_genes(adata, cfg.genes)  # before importing scanpy (seconds): fail fast
    import scanpy as sc

    sub = adata[:, list(cfg.genes)].copy()
    sub.X = sub.X.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(sub, target_sum=cfg.target_sum)
        sc.pp.log1p(sub, base=10 if cfg.log_base == "10" else None)
    x = sub.X.toarray() if hasattr(sub.X, "toarray") else np.asarray(sub.X)
    return np.ascontiguousarray(x, dtype=np.float32)


def raw_counts(adata, genes: Sequence[str]) -> np.ndarray:
    """The raw counts of ``genes`` (N, G) float32 dense, in the order given."""
    check_genes(adata, genes)
    x = adata[:, list(genes)].X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)
