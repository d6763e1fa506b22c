"""Bank build / save / load, and its refusals.

Expected bank contents come from an independent float64 computation
(:mod:`helpers.oracles`): the spot encoder run by hand on runs of ``seq_len`` spots per
section, expression normalised from the raw counts. Tolerances: float32 embeddings
against float64 ``rtol=1e-4, atol=1e-5`` (layer-normed values of order 1, float32
rounding through a Transformer block ~1e-6); expressions ``rtol=1e-5, atol=1e-6``.
"""

import numpy as np
import pytest
from helpers import tiny_model
from helpers.oracles import knn_predict, normalised_expression, spot_embeddings_f64

from mclx.bank import FORMAT_VERSION, build_bank, load_bank, save_bank
from mclx.checkpoint import load_checkpoint, save_checkpoint
from mclx.data.dataset import build_table
from mclx.data.her2st import read_her2st
from mclx.errors import FingerprintMismatch, FormatError
from mclx.inference import match
from mclx.inference.embed import spot_embeddings


@pytest.fixture(scope="module")
def ckpt(synthetic, tmp_path_factory):
    """The tiny model trained two epochs in batches (attention runs) of 32 spots."""
    path = tmp_path_factory.mktemp("ck") / "m.pt"
    return tiny_model(synthetic, epochs=2, batch_size=32).save(path)


def test_build_includes_imageless_sections_and_round_trips(ckpt, synthetic, tmp_path):
    bank = build_bank(ckpt, synthetic)
    assert sorted(set(bank.sections.tolist())) == ["S1", "S2", "S3", "S4"]  # S4 has no image
    ck = load_checkpoint(ckpt)
    pre = ck.preprocess
    assert ck.model.cfg.seq_len == 32 and ck.model.cfg.context == "batch"
    adatas = read_her2st(synthetic)
    assert bank.spot_ids.tolist() == [str(n) for a in adatas.values() for n in a.obs_names]
    expected = spot_embeddings_f64(ck.model, adatas, pre.genes, pre.log_base)
    np.testing.assert_allclose(bank.embeddings, expected, rtol=1e-4, atol=1e-5)
    # the runs matter: whole-section attention would give other embeddings
    whole = spot_embeddings_f64(ck.model, adatas, pre.genes, pre.log_base, seq_len=10**6)
    assert np.abs(whole - expected).max() > 1e-2
    expr = np.concatenate(
        [normalised_expression(a, pre.genes, pre.log_base) for a in adatas.values()]
    )
    np.testing.assert_allclose(bank.expressions, expr, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        bank.positions, np.concatenate([a.obs[["x", "y"]] for a in adatas.values()])
    )
    path = save_bank(bank, tmp_path / "b.npz")
    back = load_bank(path)
    np.testing.assert_array_equal(back.embeddings, bank.embeddings)
    assert back.genes == bank.genes and back.fingerprint == ck.fingerprint
    assert list(back.spot_ids[:2]) == ["S1_1x1", "S1_1x2"]
    assert (back.k, back.distance, back.weighting) == (200, "l2", "inverse_square")
    back.check_compatible(ck.fingerprint, ck.preprocess.genes)
    with pytest.raises(FingerprintMismatch, match="rebuild the bank"):
        back.check_compatible("0" * 16)
    queries = np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32)
    pred = match(queries, back, k=10)  # the bank's own distance and weighting
    want = knn_predict(queries, expected, expr, 10)
    # float32 keys move cosines by ~1e-6: only a near-tie at the 10th neighbour (a
    # margin under 1e-5) could change the neighbour set
    sure = want.sure(1e-5)
    assert sure.sum() >= 6, want.margin
    np.testing.assert_allclose(pred[sure], want.pred[sure], rtol=1e-4, atol=1e-5)


def test_bank_info_lists_sections_and_every_gene(ckpt, synthetic, tmp_path, capsys):
    """`mclx bank info` names every gene (a user looks for a marker before --plot)."""
    from helpers.cli import run_cli

    path = save_bank(build_bank(ckpt, synthetic, sections=["S1", "S2"]), tmp_path / "b.npz")
    genes = load_checkpoint(ckpt).preprocess.genes
    res = run_cli(capsys, ["bank", "info", path])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "sections (2): S1, S2" in lines
    assert f"genes ({len(genes)}): {', '.join(genes)}" in lines


def test_sequence_context_is_per_section(ckpt, synthetic):
    """Batch context embeds runs of `seq_len` spots of one section: the first run of S2
    must not depend on S1's spots."""
    ck = load_checkpoint(ckpt)
    both = build_table(read_her2st(synthetic, ["S1", "S2"]), ck.preprocess)
    only = build_table(read_her2st(synthetic, ["S2"]), ck.preprocess)
    e_both = spot_embeddings(ck.model, both)
    e_only = spot_embeddings(ck.model, only)
    np.testing.assert_allclose(e_both[both.section == "S2"], e_only, rtol=1e-5, atol=1e-6)


def _rewrite(path, **changes):
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    data.update(changes)
    np.savez(path, **data)


def test_bad_banks_are_refused(ckpt, synthetic, tmp_path):
    good = save_bank(build_bank(ckpt, synthetic, sections=["S1"]), tmp_path / "g.npz")
    cases = {
        "newer": dict(format_version=np.array(FORMAT_VERSION + 1)),
        "empty": dict(
            embeddings=np.zeros((0, 256), np.float32),
            expressions=np.zeros((0, 40), np.float32),
            sections=np.array([], str),
        ),
        "nan": dict(embeddings=np.full((100, 256), np.nan, np.float32)),
        "shape": dict(expressions=np.zeros((100, 3), np.float32)),
        "format": dict(format=np.array("something-else")),
    }
    for name, change in cases.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(good.read_bytes())
        _rewrite(path, **change)
        with pytest.raises(FormatError, match=f"{name}.npz"):
            load_bank(path)
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[:500])
    with pytest.raises(FormatError, match="trunc.npz"):
        load_bank(trunc)
    with pytest.raises(FileNotFoundError):
        load_bank(tmp_path / "none.npz")


def test_stnet_checkpoint_has_no_bank(synthetic, tmp_path):
    from mclx.config import PreprocessCfg
    from mclx.models import create_model, model_cfg

    net = create_model(model_cfg("stnet", encoder="tiny_cnn", n_genes=40))
    pre = PreprocessCfg(genes=tuple(f"GENE{i:03d}" for i in range(40)))
    save_checkpoint(tmp_path / "s.pt", net, preprocess=pre)
    with pytest.raises(FormatError, match="needs no bank"):
        build_bank(tmp_path / "s.pt", synthetic)
