"""The paper's analyses beyond Table 1, on predictions with their measured truth.

Input: the ``.predictions.h5ad`` that ``mclx evaluate`` writes beside its results (or the
results JSON, which names it), or any AnnData with predicted ``X``,
``layers["measured"]`` and ``obs["section"]``. Per section:

- per-gene Pearson r and its p-value (scipy), and the paper's gene ranking by the mean
  -log10(p) over sections (its Supplementary Table S2);
- mean PCC over gene panels: ACG (all genes), HEG (50 most expressed), HVG (50 most
  variable measured genes of the section) and a marker list (BLEEP, CMRCNet);
- gene-gene correlation preservation: the measured gene-gene correlation matrix,
  clustered (scipy, average linkage on 1 - r), the predicted one in the same order, and
  the correlation of their upper triangles;
- spatial domains: PCA then KMeans (scikit-learn) on predicted expression, with ARI and
  NMI against pathologist labels (``obs["label"]``) when there are any.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mclx.errors import DataError

N_PANEL = 50  # genes in the HEG and HVG panels, as in the paper's HEG
P_FLOOR = 1e-300  # p-values below this (underflow) count as this in -log10(p)


def load_predictions(path: str | os.PathLike):
    """Predictions with truth from an ``.h5ad``, or from the results JSON naming it."""
    import json

    from mclx.artifacts import require_file

    path = require_file(path, "predictions", error=DataError)
    if path.suffix == ".json":
        try:
            name = json.loads(path.read_text())["predictions"]
            if not isinstance(name, str) or not name.strip():
                raise TypeError(name)  # another tool's JSON: a number, a list, null
            beside = path.with_name(Path(name).name)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            msg = f"{path}: results JSON names no predictions file (rerun mclx evaluate)"
            raise DataError(msg) from exc
        return load_predictions(beside)
    import anndata as ad

    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # OSError from h5py, and anndata's own errors
        msg = f"{path}: cannot read AnnData ({exc.__class__.__name__}: {exc})"
        raise DataError(msg) from exc
    missing = [w for w, ok in (("layers['measured']", "measured" in adata.layers),
                               ("obs['section']", "section" in adata.obs)) if not ok]  # fmt: skip
    if missing:
        msg = f"{path}: predictions need {' and '.join(missing)} (the measured truth)"
        raise DataError(msg)
    return adata


def section_arrays(adata, section: str) -> tuple[np.ndarray, np.ndarray, list[str], Any]:
    """(predicted, measured, genes, rows) of one section, float64, without the genes
    that are NaN there (outside that fold's panel)."""
    rows = adata[np.asarray(adata.obs["section"] == section)]
    pred = np.asarray(_dense(rows.X), np.float64)
    true = np.asarray(_dense(rows.layers["measured"]), np.float64)
    keep = np.isfinite(pred).all(0) & np.isfinite(true).all(0)
    genes = [str(g) for g in np.asarray(adata.var_names)[keep]]
    return pred[:, keep], true[:, keep], genes, rows


def _dense(x) -> np.ndarray:
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


def gene_pvalues(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r and two-sided p-value of each gene across spots (scipy.stats.pearsonr);
    NaN where a gene is constant."""
    import warnings

    from scipy.stats import pearsonr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant genes: NaN, dropped by the callers
        res = pearsonr(pred, true, axis=0)
    return np.asarray(res.statistic, np.float64), np.asarray(res.pvalue, np.float64)


def gene_ranking(adata, sections: Sequence[str]):
    """Per-gene r and p in every section and the paper's ranking by mean -log10(p).

    A gene's mean is over the sections where it has a p-value; the table is sorted by
    ``mean_neglog10_p`` (rank 1 first)."""
    import pandas as pd

    cols = {}
    for s in sections:
        pred, true, genes, _ = section_arrays(adata, s)
        r, p = gene_pvalues(pred, true)
        cols[f"pcc_{s}"] = pd.Series(r, index=genes)
        cols[f"p_{s}"] = pd.Series(p, index=genes)
    table = pd.DataFrame(cols)
    p = table[[f"p_{s}" for s in sections]]
    table.insert(0, "mean_neglog10_p", -np.log10(p.clip(lower=P_FLOOR)).mean(1, skipna=True))
    table.insert(1, "mean_pcc", table[[f"pcc_{s}" for s in sections]].mean(1, skipna=True))
    table = table.sort_values("mean_neglog10_p", ascending=False, kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table.index.name = "gene"
    return table


def panels(
    pred: np.ndarray, true: np.ndarray, genes: list[str], markers: Sequence[str] = ()
) -> dict[str, float]:
    """Mean PCC over ACG, HEG (most expressed), HVG (most variable measured genes of
    this section) and the markers present; the marker count beside it."""
    from mclx.evaluation.metrics import pearson_per_gene, top_expressed

    r = pearson_per_gene(pred, true)
    hvg = np.argsort(-true.var(0), kind="stable")[:N_PANEL]
    idx = [i for i, g in enumerate(genes) if g in set(markers)]

    def mean(sel) -> float:
        vals = r[sel]
        return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")

    out = {
        "pcc_acg": mean(slice(None)),
        "pcc_heg": mean(top_expressed(true, N_PANEL)),
        "pcc_hvg": mean(hvg),
    }
    if markers:
        out |= {"pcc_markers": mean(idx) if idx else float("nan"), "n_markers": len(idx)}
    return out


@dataclass
class GeneGene:
    """Measured and predicted gene-gene correlations of a section, in the order of the
    measured matrix's clustering, and the correlation of their upper triangles."""

    genes: list[str]
    measured: np.ndarray
    predicted: np.ndarray
    preservation: float


def gene_gene(pred: np.ndarray, true: np.ndarray, genes: list[str]) -> GeneGene:
    """Gene-gene correlation preservation over the genes that vary in both."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    ok = (true.std(0) > 0) & (pred.std(0) > 0)
    if ok.sum() < 3:
        msg = "gene-gene correlation needs at least three genes that vary"
        raise DataError(msg)
    t, p = true[:, ok], pred[:, ok]
    cm, cp = np.corrcoef(t, rowvar=False), np.corrcoef(p, rowvar=False)
    order = leaves_list(linkage(squareform(1 - cm, checks=False), method="average"))
    iu = np.triu_indices(len(cm), k=1)
    value = float(np.corrcoef(cm[iu], cp[iu])[0, 1])
    names = [g for g, k in zip(genes, ok) if k]
    return GeneGene([names[i] for i in order], cm[np.ix_(order, order)],
                    cp[np.ix_(order, order)], value)  # fmt: skip


@dataclass
class Domains:
    """KMeans domains of a section and, with labels, their agreement with them."""

    domains: np.ndarray
    k: int
    ari: float = float("nan")
    nmi: float = float("nan")
    n_labelled: int = 0
    labels: np.ndarray | None = field(default=None, repr=False)


def spatial_domains(
    expr: np.ndarray,
    *,
    k: int | None = None,
    labels: Sequence[Any] | None = None,
    n_pcs: int = 10,
    seed: int = 0,
) -> Domains:
    """PCA (``n_pcs`` components) then KMeans with ``k`` clusters (default: the number
    of distinct labels, else 5); ARI and NMI against the labelled spots."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    lab = None if labels is None else np.asarray(labels, dtype=object)
    known = None if lab is None else np.array([_is_label(v) for v in lab])
    if k is None:
        k = len(set(lab[known])) if known is not None and known.any() else 5
    n = min(n_pcs, expr.shape[0] - 1, expr.shape[1])
    pcs = PCA(n_components=n, random_state=seed).fit_transform(expr)
    domains = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(pcs)
    out = Domains(domains=domains, k=k, labels=lab)
    if known is not None and known.sum() > 1:
        truth, found = lab[known].astype(str), domains[known]
        out.ari = float(adjusted_rand_score(truth, found))
        out.nmi = float(normalized_mutual_info_score(truth, found))
        out.n_labelled = int(known.sum())
    return out


def _is_label(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v) != "nan"


@dataclass
class Analysis:
    """Everything ``mclx analyze`` computes, as tables (pandas) and per-section parts."""

    adata: Any
    ranking: Any
    panels: Any
    gene_gene: Any
    domains: Any
    parts: dict[str, tuple[GeneGene, GeneGene, Domains, Any]]
    unknown_markers: list[str] = field(default_factory=list)  # not in the predictions


def analyze(
    source: str | os.PathLike,
    *,
    markers: Sequence[str] = (),
    k: int | None = None,
    seed: int = 0,
    markers_from: str = "--markers",
) -> Analysis:
    """Run every analysis on the predictions of ``source`` (see the module docstring).
    ``markers_from``: where the markers come from (their file), for the messages."""
    import pandas as pd

    adata = load_predictions(source)
    unknown = check_markers(adata, markers, markers_from)
    sections = [str(s) for s in dict.fromkeys(adata.obs["section"].astype(str))]
    ranking = gene_ranking(adata, sections)
    panel_rows, gg_rows, dom_rows, parts = {}, {}, {}, {}
    domains = pd.Series("", index=adata.obs_names, dtype=object)
    for s in sections:
        pred, true, genes, rows = section_arrays(adata, s)
        panel_rows[s] = panels(pred, true, genes, markers)
        gg_all = gene_gene(pred, true, genes)
        heg = np.sort(np.argsort(-true.mean(0), kind="stable")[:N_PANEL])
        gg_heg = gene_gene(pred[:, heg], true[:, heg], [genes[i] for i in heg])
        gg_rows[s] = {
            "n_genes": len(gg_all.genes),
            "preservation": gg_all.preservation,
            "preservation_heg50": gg_heg.preservation,
        }
        labels = rows.obs["label"].to_numpy() if "label" in rows.obs else None
        dom = spatial_domains(pred, k=k, labels=labels, seed=seed)
        dom_rows[s] = {"k": dom.k, "ari": dom.ari, "nmi": dom.nmi, "n_labelled": dom.n_labelled}
        domains[rows.obs_names] = [f"{s}:{d}" for d in dom.domains]
        parts[s] = (gg_all, gg_heg, dom, rows)
    adata.obs["domain"] = pd.Categorical(domains.to_numpy())
    stats = ranking[["rank", "mean_neglog10_p", "mean_pcc"]].reindex(adata.var_names)
    for col in stats:
        adata.var[col] = stats[col].to_numpy()
    frame = lambda rows: pd.DataFrame.from_dict(rows, orient="index").rename_axis("section")  # noqa: E731
    tables = frame(panel_rows), frame(gg_rows), frame(dom_rows)
    return Analysis(adata, ranking, *tables, parts, unknown)


def check_markers(adata, markers: Sequence[str], source: str) -> list[str]:
    """The markers that are not among the predictions' genes (to be reported); none of
    them there is refused (a panel of no gene has no PCC)."""
    if not markers:
        return []
    genes = set(map(str, adata.var_names))
    unknown = [m for m in markers if m not in genes]
    if len(unknown) == len(markers):
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        shown = ", ".join(unknown[:5]) + more
        msg = (
            f"{source}: none of its {len(markers)} marker genes is in the predictions' "
            f"{len(genes)} genes ({shown})"
        )
        raise DataError(msg)
    return unknown


def write_analysis(res: Analysis, out: str | os.PathLike, *, top: int = 4) -> list[Path]:
    """Tables (CSV), the annotated predictions (h5ad) and the figures (PNG) in ``out``,
    all or none."""
    out = Path(out)
    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write_files(res, out, top)
    except BaseException:
        for p in created:  # the folders made for it, left empty by the failed write
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _write_files(res: Analysis, out: Path, top: int) -> list[Path]:
    from mclx.evaluation import analyze_plots as plots
    from mclx.files import all_or_nothing, atomic_path

    written = []
    with all_or_nothing():
        for name, table in (("gene_ranking", res.ranking), ("panels", res.panels),
                            ("gene_gene", res.gene_gene), ("domains", res.domains)):  # fmt: skip
            with atomic_path(out / f"{name}.csv") as tmp:
                table.to_csv(tmp)
            written.append(out / f"{name}.csv")
        with atomic_path(out / "analysis.h5ad", suffix=".h5ad") as tmp:
            res.adata.write_h5ad(tmp)
        written.append(out / "analysis.h5ad")
        best = max(res.parts, key=lambda s: res.parts[s][3].n_obs)
        written.append(_top_genes(res, best, out / f"top_genes_{best}.png", top))
        for s, (_, gg_heg, dom, rows) in res.parts.items():
            xy = np.asarray(rows.obsm["spatial"])
            written.append(plots.gene_gene_figure(out / f"gene_gene_{s}.png", s, gg_heg))
            written.append(plots.domains_figure(out / f"domains_{s}.png", s, xy, dom))
    return written


def _top_genes(res: Analysis, section: str, path: Path, top: int) -> Path:
    from mclx.evaluation.analyze_plots import top_genes_figure

    pred, true, genes, rows = section_arrays(res.adata, section)
    ranked = [g for g in res.ranking.index if g in set(genes)][:top]
    idx = [genes.index(g) for g in ranked]
    pcc = res.ranking.loc[ranked, f"pcc_{section}"].to_numpy()
    xy = np.asarray(rows.obsm["spatial"])
    return top_genes_figure(path, section, xy, ranked, true[:, idx], pred[:, idx], pcc)
