"""``mclx analyze``: the paper's analyses of predictions with their truth
(:mod:`mclx.evaluation.analyze`)."""

from __future__ import annotations

from pathlib import Path

import click

from mclx.cli.options import CONTEXT, out_option
from mclx.cli.paths import MclxCommand, path_argument, path_option


@click.command(cls=MclxCommand, context_settings=CONTEXT)
@path_argument("source", role="input")
@out_option("Folder for the tables, annotated predictions and figures.", required=True, folder=True)
@path_option(
    "--markers",
    role="input",
    help="Marker genes (one per line, or .npy) reported as a panel beside ACG, HEG, HVG.",
)
@click.option(
    "--k",
    "n_domains",
    type=click.IntRange(2),
    default=None,
    help="Spatial domains per section (default: the number of labels, else 5).",
)
@click.option("--top", type=click.IntRange(1, 12), default=4, show_default=True,
              help="Top-ranked genes drawn as measured vs predicted maps.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="PCA / KMeans seed.")
def analyze(source: Path, out: Path, markers, n_domains, top, seed) -> None:
    """The paper's analyses on predictions with their truth (beyond Table 1).

    \b
    SOURCE: the results JSON of `mclx evaluate` (or the .predictions.h5ad beside it), or
    any .h5ad with predicted X, layers["measured"] and obs["section"]. Writes to --out:
      gene_ranking.csv   per-gene r and p per section, ranked by mean -log10(p)
      panels.csv         mean PCC over ACG, HEG, HVG (and --markers) per section
      gene_gene.csv      gene-gene correlation preservation per section
      domains.csv        KMeans domains on predicted expression: ARI / NMI vs labels
      analysis.h5ad      the predictions with obs["domain"] and the ranking in var
      *.png              top genes' maps, gene-gene heatmaps, domain maps
    \b
    Examples:
      mclx evaluate --freeze-encoder --out her2.json && mclx analyze her2.json --out her2_analysis
      mclx analyze her2.predictions.h5ad --markers markers.txt --k 6 --out her2_analysis
    """
    from mclx.data.preprocess import load_gene_list
    from mclx.evaluation.analyze import analyze as run_analysis
    from mclx.evaluation.analyze import write_analysis

    genes = load_gene_list(markers) if markers else ()
    res = run_analysis(source, markers=genes, k=n_domains, seed=seed, markers_from=str(markers))
    if res.unknown_markers:
        u = res.unknown_markers
        click.echo(f"mclx: warning: {markers}: {len(u)} of {len(genes)} markers are not in the "
                   f"predictions, left out: {', '.join(u[:10])}" + (" ..." if len(u) > 10 else ""),
                   err=True)  # fmt: skip
    unlabelled = [str(s) for s, n in res.domains["n_labelled"].items() if not n]
    written = write_analysis(res, out, top=top)
    click.echo(res.ranking.head(10)[["rank", "mean_neglog10_p", "mean_pcc"]].to_string())
    click.echo(res.panels.to_string())
    if unlabelled:  # domains.csv's ARI / NMI columns are empty there: say why (a result, so
        # on stdout with the others; stderr keeps to warnings and the one error line)
        click.echo(f"mclx: note: no pathologist labels (obs['label']) in {', '.join(unlabelled)}: "
                   "spatial domains found but not scored (no ARI / NMI)")  # fmt: skip
    click.echo(f"mclx: wrote {len(written)} files to {out}")
