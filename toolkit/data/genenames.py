"""Gene names people type: symbols where the data carries them, with the IDs beside.

Counts named by Ensembl IDs (STUtility's MOB data: ``ENSMUSG00000064339.1``) are renamed
to the symbols of a feature file beside them, when there is one: ``NAME.features.tsv``
or ``features.tsv`` (``.gz`` too; 10x's layout: ID, symbol[, type], tab-separated, no
header; or a two-column ``gene_id``/``gene_name`` table with a header). ``var_names``
become the symbols (made unique as scanpy does, IDs without a symbol kept), and
``var["gene_ids"]`` holds the IDs. :func:`resolve_gene` finds a gene typed by symbol, by
ID, or by an Ensembl ID without its version.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mclx.errors import DataError, short

FEATURE_FILES = ("{section}.features.tsv", "{section}.features.tsv.gz", "features.tsv",
                 "features.tsv.gz")  # fmt: skip
_VERSION = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+$")


def feature_file(folder: Path, section: str) -> Path | None:
    """The feature file of ``section`` in ``folder`` (its own, else the folder's)."""
    for name in FEATURE_FILES:
        path = folder / name.format(section=section)
        if path.is_file():
            return path
    return None


def read_feature_names(path: Path) -> dict[str, str]:
    """ID -> symbol of a feature file (see the module docstring)."""
    try:
        table = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)
    except (OSError, ValueError, EOFError) as exc:
        msg = f"{path}: cannot read the feature file ({short(exc)})"
        raise DataError(msg) from exc
    if table.shape[1] < 2:
        msg = f"{path}: a feature file needs two tab-separated columns, ID and symbol"
        raise DataError(msg)
    if str(table.iloc[0, 0]).lower() in ("gene_id", "gene_ids", "id", "ensembl"):
        table = table.iloc[1:]
    return {str(i): str(s) for i, s in zip(table[0], table[1]) if s}


def name_genes(adata, names: dict[str, str]) -> None:
    """Rename ``adata``'s genes (IDs) to their symbols, in place; IDs into
    ``var["gene_ids"]``. Matches IDs with or without their version."""
    bare = {unversioned(k): v for k, v in names.items()}
    ids = [str(g) for g in adata.var_names]
    adata.var["gene_ids"] = ids
    adata.var_names = [names.get(g) or bare.get(unversioned(g)) or g for g in ids]
    adata.var_names_make_unique()


def unversioned(gene: str) -> str:
    """An Ensembl gene ID without its version (``ENSMUSG00000064339.1`` ->
    ``ENSMUSG00000064339``); other names unchanged."""
    m = _VERSION.match(gene)
    return m[1] if m else gene


def resolve_gene(gene: str, names: Sequence[str], ids: Sequence[str] | None = None) -> str | None:
    """The name in ``names`` of ``gene`` typed as a name, as its ID (``ids``, parallel to
    ``names``), or as an Ensembl ID without version; None when none matches."""
    names = [str(n) for n in names]
    if gene in names:
        return gene
    ids = [str(i) for i in ids] if ids is not None and len(ids) == len(names) else []
    for pool in (ids, names):
        for i, cand in enumerate(pool):
            if cand == gene or unversioned(cand) == gene:
                return names[i]
    return None


def missing_hint(genes: Sequence[str]) -> str:
    """What to say when typed genes are not found among ``genes``: how they are named."""
    sample = [str(g) for g in list(genes)[:2]]
    if sample and all(_VERSION.match(g) or g.startswith("ENS") for g in sample):
        return (
            f" (genes are Ensembl IDs, e.g. {', '.join(sample)}: give one, with or without "
            "its version, or train with symbols from a features.tsv beside the counts)"
        )
    return f" (genes are named like {', '.join(sample)}; 'mclx bank info' lists them)"
