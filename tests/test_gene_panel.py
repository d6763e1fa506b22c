"""Leak-free gene panels: with --n-hvg, each fold of `mclx evaluate` chooses its genes on
its training sections only (HEST issue 89, mclSTExp issue 5); a given list is used as is."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from mclx.config import TrainCfg
from mclx.data.her2st import read_her2st
from mclx.data.preprocess import highly_variable_genes, load_gene_list
from mclx.training.recipe import Recipe

LEAK = [f"LEAK{i}" for i in range(4)]


@pytest.fixture(scope="module")
def leaky(synthetic, tmp_path_factory):
    """The synthetic images and spots with new counts: 300 genes of plain Poisson noise
    at the same rates in every section, and four LEAK genes at one rate in S1 and S3 but
    all-or-nothing in S2, so they enter a panel only if S2's counts are looked at."""
    root = tmp_path_factory.mktemp("leaky") / "d"
    shutil.copytree(synthetic, root)
    rng = np.random.default_rng(1)
    rates = rng.uniform(5, 60, size=300)
    for section in ("S1", "S2", "S3", "S4"):
        path = root / "data" / "ST-cnts" / f"{section}.tsv.gz"
        spots = pd.read_csv(path, sep="\t", index_col=0).index
        df = pd.DataFrame(
            rng.poisson(rates, size=(len(spots), len(rates))),
            index=spots,
            columns=[f"GENE{i:03d}" for i in range(len(rates))],
        )
        for g in LEAK:
            vary = section == "S2"
            df[g] = rng.choice([0, 80], len(df)) if vary else rng.poisson(20, len(df))
        with gzip.open(path, "wt") as fh:
            df.to_csv(fh, sep="\t")
    return root


def test_hvg_panel_of_a_fold_ignores_the_held_out_section(leaky):
    adatas = read_her2st(leaky, ["S1", "S2", "S3"])
    everywhere = highly_variable_genes(list(adatas.values()), n_top=30)
    assert len(set(LEAK) & set(everywhere)) >= 2  # the leak this guards against is real
    r = Recipe(n_hvg=30)
    fold = r.genes(leaky, {s: adatas[s] for s in ("S1", "S3")}, [adatas["S2"]])
    assert len(fold) == 30 and not set(LEAK) & set(fold)
    assert fold == highly_variable_genes([adatas["S1"], adatas["S3"]], n_top=30)
    # a given list is used as given, whatever the sections
    given = Recipe(genes_file=leaky / "genes.txt")
    assert given.genes(leaky, {"S2": adatas["S2"]}) == load_gene_list(leaky / "genes.txt")
    assert given.gene_panel(leaky)["source"] == "file"


def test_evaluate_chooses_each_folds_genes_on_its_training_sections(leaky, tmp_path):
    from mclx.evaluation.evaluate import cross_validate, write_results

    recipe = Recipe(
        overrides={"encoder": "tiny_cnn"},
        train=TrainCfg(epochs=1, batch_size=32, freeze_encoder=True),
        n_hvg=10,
        encoder_weights=None,
    )
    res = cross_validate(leaky, recipe, sections=["S1", "S2"], k=20, progress=False)
    out, _ = write_results(res, tmp_path / "r.json")
    saved = json.loads(out.read_text())
    assert saved["config"]["gene_panel"]["source"] == "highly_variable_genes"
    assert "training sections only" in saved["config"]["gene_panel"]["chosen_on"]
    s2 = saved["folds"]["S2"]
    assert s2["train"] == ["S1"] and len(s2["genes"]) == 10
    assert not set(LEAK) & set(s2["genes"])  # S2's own variable genes stay out of its fold
    s1 = saved["folds"]["S1"]
    assert s1["train"] == ["S2"] and set(LEAK) <= set(s1["genes"])  # trained on S2: fair
