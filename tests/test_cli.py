"""The command line as a user runs it: subprocess, real arguments, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, mclx, tiny_options, tiny_train_args

from mclx.checkpoint import load_checkpoint


def test_help_and_version():
    res = mclx("--help")
    assert res.returncode == 0 and "train" in res.stdout and "evaluate" in res.stdout
    assert "Examples" in mclx("train", "--help").stdout
    assert mclx("--version").stdout.startswith("mclx, version")


def test_train_writes_checkpoint_that_loads(synthetic, tmp_path):
    out = tmp_path / "m.pt"
    res = mclx(*tiny_train_args(synthetic, out, "--holdout", "S3", sections=None))
    assert res.returncode == 0, res.stderr
    ck = load_checkpoint(out)
    assert ck.provenance["sections"] == ["S1", "S2"] and ck.provenance["holdout"] == ["S3"]
    assert ck.provenance["epochs"] == 3 and len(ck.provenance["loss_history"]) == 3
    assert len(ck.preprocess.genes) == 40 and ck.preprocess.log_base == "10"
    assert ck.preprocess.mpp == pytest.approx(200 / 224, rel=0.01)
    assert ck.model_cfg.pos_size == (11, 11) and ck.model_cfg.seq_len == 32  # --batch-size
    raw = torch.load(out, weights_only=True)
    assert raw["fingerprint"] == ck.fingerprint


def test_evaluate_learns_the_synthetic_signal(synthetic, tmp_path):
    out = tmp_path / "res.json"
    res = mclx(
        "evaluate",
        "--data",
        synthetic,
        *tiny_options(synthetic, epochs=20, lr=3e-3),  # ~0.42 (one epoch at 1e-5: ~0.03)
        "--k",
        "20",
        "--bank-sections",
        "all",
        "-q",
        "--out",
        out,
    )
    assert res.returncode == 0, res.stderr
    assert "PCC(ACG)" in res.stdout and "mean±std" in res.stdout
    data = json.loads(out.read_text())
    assert set(data["sections"]) == {"S1", "S2", "S3"}
    assert data["config"]["bank_sections"] == ["S1", "S2", "S3", "S4"] and data["config"]["k"] == 20
    for m in ("pcc_acg", "pcc_heg", "mse", "mae"):
        vals = [r[m] for r in data["sections"].values()]
        assert data["mean"][m] == pytest.approx(np.mean(vals))
        assert data["std"][m] == pytest.approx(np.std(vals))
    # images carry the expression programmes: retrieval must beat chance clearly
    assert data["mean"]["pcc_acg"] > 0.2, data["mean"]
    genes_csv = tmp_path / "res.genes.csv"
    assert genes_csv.read_text().startswith("gene,S1,S2,S3")


def test_stnet_and_bleep_run(synthetic, tmp_path):
    for model in ("stnet", "bleep"):
        out = tmp_path / f"{model}.json"
        options = tiny_options(synthetic, model=model, epochs=2, batch_size=None)
        res = mclx(
            "evaluate", "--data", synthetic, "--sections", "S1,S2", *options, "-q", "--out", out
        )
        assert res.returncode == 0, res.stderr
        cfg = json.loads(out.read_text())["config"]
        assert cfg["model"]["name"] == model
        if model == "bleep":
            assert cfg["k"] == 50 and cfg["weighting"] == "mean"


def test_missing_data_folder(tmp_path):
    res = mclx("train", "--data", tmp_path / "nothing", "--out", tmp_path / "m.pt")
    assert_one_line_error(res, "nothing", "does not exist")
    assert not (tmp_path / "m.pt").exists()


def test_unknown_section(synthetic, tmp_path):
    res = mclx("train", "--data", synthetic, "--sections", "S1,Q7", "--out", tmp_path / "m.pt")
    assert_one_line_error(res, "Q7", "does not exist")
    res = mclx("evaluate", "--data", synthetic, "--sections", "S1,Q7", "--out", tmp_path / "r.json")
    assert_one_line_error(res, "Q7")
    assert list(tmp_path.iterdir()) == []


def test_gene_list_with_absent_genes(synthetic, tmp_path):
    genes = tmp_path / "genes.txt"
    genes.write_text("GENE001\nNOT_A_GENE\n")
    res = mclx(
        "train",
        "--data",
        synthetic,
        "--genes",
        genes,
        "--out",
        tmp_path / "m.pt",
        "--encoder",
        "tiny_cnn",
    )
    assert_one_line_error(res, "S1.tsv.gz", "NOT_A_GENE", "missing")
    assert not (tmp_path / "m.pt").exists()


def test_unwritable_output_folder(synthetic, tmp_path):
    res = mclx(*tiny_train_args(synthetic, tmp_path / "no" / "m.pt", epochs=1, batch_size=None))
    assert_one_line_error(res, "m.pt", "does not exist")


def test_warnings_are_one_line_without_source(tmp_path):
    """A warning during a command reads `mclx: warning: ...` on one line, not Python's
    file:line header and source line (the random-init warning looked like a crash)."""
    import os
    import subprocess
    import sys

    code = (
        "from mclx.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "from mclx.models import create_encoder\n"
        "create_encoder('densenet121')\n"
    )
    env = {**os.environ, "TORCH_HOME": str(tmp_path)}  # no cached ImageNet weights
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("mclx: warning: densenet121: no ImageNet weights in ")
    assert lines[0].endswith("using random initialisation")
