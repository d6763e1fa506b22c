"""`mclx analyze` against independent float64 statistics, and its outputs as a user
opens them (pandas, anndata, PIL)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_line_error, needs, run_cli
from scipy import stats

from mclx.evaluation.analyze import P_FLOOR, gene_gene, gene_pvalues, gene_ranking, spatial_domains


def _predictions(seed: int = 0, sections=("S1", "S2"), n: int = 60, g: int = 12):
    """Predictions with truth: gene j's prediction is its truth plus noise growing with
    j, so the ranking is known in advance (gene 0 best)."""
    rng = np.random.default_rng(seed)
    parts = []
    for s in sections:
        true = rng.gamma(2.0, 1.0, size=(n, g))
        pred = true + rng.normal(size=(n, g)) * np.linspace(0.1, 3.0, g)
        a = ad.AnnData(
            X=pred.astype(np.float32), var=pd.DataFrame(index=[f"G{j}" for j in range(g)])
        )
        a.layers["measured"] = true.astype(np.float32)
        a.obs_names = [f"{s}_{i}" for i in range(n)]
        a.obs["section"] = s
        a.obs["label"] = np.where(np.arange(n) < n // 2, "tumour", "stroma")
        a.obsm["spatial"] = rng.uniform(0, 1000, size=(n, 2))
        parts.append(a)
    return ad.concat(parts)


def test_pvalues_match_the_t_distribution():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 5))
    y = x * [0.0, 0.2, 0.5, 1.0, 3.0] + rng.normal(size=(40, 5))
    r, p = gene_pvalues(x, y)
    for j in range(5):  # float64 oracle: r from sums, p from Student's t with n - 2 dof
        a, b = x[:, j] - x[:, j].mean(), y[:, j] - y[:, j].mean()
        rj = (a @ b) / np.sqrt((a @ a) * (b @ b))
        t = rj * np.sqrt(38 / (1 - rj**2))
        assert r[j] == pytest.approx(rj, rel=1e-10)
        assert p[j] == pytest.approx(2 * stats.t.sf(abs(t), 38), rel=1e-6)


def test_ranking_is_the_mean_of_minus_log10_p_over_sections():
    adata = _predictions()
    table = gene_ranking(adata, ["S1", "S2"])
    expected = {}
    for gene in adata.var_names:
        ps = []
        for s in ("S1", "S2"):
            rows = adata[adata.obs["section"] == s]
            ps.append(
                stats.pearsonr(
                    rows[:, gene].X.ravel().astype(float),
                    rows[:, gene].layers["measured"].ravel().astype(float),
                )[1]
            )
        expected[gene] = float(np.mean(-np.log10(np.maximum(ps, P_FLOOR))))  # underflow
    got = table["mean_neglog10_p"].to_dict()
    assert got == pytest.approx(expected, rel=1e-6)
    assert list(table.index) == sorted(expected, key=expected.get, reverse=True)
    assert table.index[0] == "G0" and list(table["rank"]) == list(range(1, 13))


def test_gene_gene_preservation_is_one_for_a_perfect_prediction():
    rng = np.random.default_rng(5)
    true = rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8))
    same = gene_gene(true, true, [f"G{i}" for i in range(8)])
    assert same.preservation == pytest.approx(1.0)
    assert sorted(same.genes) == sorted(f"G{i}" for i in range(8))
    np.testing.assert_allclose(np.diag(same.measured), 1.0)
    noisy = gene_gene(true + rng.normal(size=true.shape) * 5, true, same.genes)
    assert noisy.preservation < 0.9


@needs("her2st")
def test_domains_of_measured_expression_follow_the_pathologist(her2st):
    """Labels exist only for sections without images: measured expression stands in."""
    from mclx.config import PreprocessCfg
    from mclx.data.dataset import build_table
    from mclx.data.her2st import read_section
    from mclx.data.preprocess import load_gene_list

    a = read_section(her2st, "B1")
    genes = load_gene_list(her2st / "her_hvg_cut_1000.npy")
    expr = build_table({"B1": a}, PreprocessCfg(genes=tuple(genes))).expr
    labels = a.obs["label"].to_numpy()
    dom = spatial_domains(expr, labels=labels)
    assert dom.k == len(set(labels)) and dom.n_labelled == a.n_obs
    from sklearn.metrics import adjusted_rand_score

    assert dom.ari == pytest.approx(adjusted_rand_score(labels, dom.domains))
    shuffled = np.random.default_rng(0).permutation(labels)
    assert dom.ari > adjusted_rand_score(shuffled, dom.domains) + 0.1


def test_cli_outputs_open_as_they_are(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "p.predictions.h5ad"
    _predictions().write_h5ad(src)
    markers = tmp_path / "markers.txt"
    markers.write_text("G0\nG1\nNOPE\n")
    res = run_cli(capsys, ["analyze", src, "--out", tmp_path / "an", "--markers", markers])
    assert res.returncode == 0, res.stderr
    ranking = pd.read_csv(tmp_path / "an" / "gene_ranking.csv", index_col="gene")
    assert ranking.index[0] == "G0" and {"pcc_S1", "p_S2"} <= set(ranking.columns)
    panels = pd.read_csv(tmp_path / "an" / "panels.csv", index_col="section")
    assert list(panels.index) == ["S1", "S2"] and (panels["n_markers"] == 2).all()
    assert (panels["pcc_markers"] > panels["pcc_acg"]).all()  # G0, G1: the least noisy
    domains = pd.read_csv(tmp_path / "an" / "domains.csv", index_col="section")
    assert (domains["k"] == 2).all() and domains["ari"].notna().all()
    out = ad.read_h5ad(tmp_path / "an" / "analysis.h5ad")
    assert out.obs["domain"].str.startswith(("S1:", "S2:")).all()
    assert out.var.loc["G0", "rank"] == 1
    for png in ("top_genes_S1.png", "gene_gene_S2.png", "domains_S1.png"):
        with Image.open(tmp_path / "an" / png) as im:
            assert im.format == "PNG" and min(im.size) > 300


def test_cli_refuses_predictions_without_truth(tmp_path, capsys):
    a = _predictions()
    del a.layers["measured"]
    a.write_h5ad(tmp_path / "p.h5ad")
    res = run_cli(capsys, ["analyze", tmp_path / "p.h5ad", "--out", tmp_path / "an"])
    assert_one_line_error(res, "p.h5ad", "layers['measured']")
    assert not (tmp_path / "an" / "gene_ranking.csv").exists()


def test_cli_says_when_there_are_no_labels_to_score_domains(tmp_path, capsys):
    src = tmp_path / "p.predictions.h5ad"
    adata = _predictions()
    del adata.obs["label"]
    adata.write_h5ad(src)
    res = run_cli(capsys, ["analyze", src, "--out", tmp_path / "an"])
    assert res.returncode == 0, res.stderr
    note = "no pathologist labels (obs['label']) in S1, S2: spatial domains found but not scored"
    assert note in res.stdout and res.stderr == ""
    labelled = tmp_path / "l.predictions.h5ad"
    _predictions().write_h5ad(labelled)
    res = run_cli(capsys, ["analyze", labelled, "--out", tmp_path / "an2"])
    assert res.returncode == 0 and "pathologist" not in res.stdout
