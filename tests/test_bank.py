"""Bank build / save / load, and its refusals."""

import numpy as np
import pytest

from mclx.bank import FORMAT_VERSION, build_bank, load_bank, save_bank
from mclx.checkpoint import load_checkpoint, save_checkpoint
from mclx.config import TrainCfg
from mclx.data.dataset import build_table
from mclx.data.her2st import read_her2st
from mclx.errors import FingerprintMismatch, FormatError
from mclx.experiment import PatchCache, make_preprocess, new_model, pos_size, train_model
from mclx.kernels import retrieve
from mclx.train import spot_embeddings


@pytest.fixture(scope="module")
def ckpt(synthetic, tmp_path_factory):
    from mclx.data.preprocess import load_gene_list

    adatas = read_her2st(synthetic, ["S1", "S2"], with_image=True)
    pre = make_preprocess(load_gene_list(synthetic / "genes.txt"), list(adatas.values()))
    allsec = read_her2st(synthetic)
    net = new_model(
        "mclstexp",
        pre,
        pos_size(list(allsec.values())),
        seed=0,
        encoder="tiny_cnn",
        encoder_weights=None,
    )
    cfg = TrainCfg(epochs=2, batch_size=32, freeze_encoder=True)
    hist, _ = train_model(net, PatchCache(adatas, 224), ["S1", "S2"], pre, cfg, progress=False)
    path = tmp_path_factory.mktemp("ck") / "m.pt"
    save_checkpoint(path, net, preprocess=pre, provenance={"train": {"batch_size": 32}})
    return path


def test_build_includes_imageless_sections_and_round_trips(ckpt, synthetic, tmp_path):
    bank = build_bank(ckpt, synthetic)
    assert sorted(set(bank.sections.tolist())) == ["S1", "S2", "S3", "S4"]  # S4 has no image
    ck = load_checkpoint(ckpt)
    table = build_table(read_her2st(synthetic), ck.preprocess)
    np.testing.assert_array_equal(bank.embeddings, spot_embeddings(ck.model, table, seq_len=32))
    np.testing.assert_array_equal(bank.expressions, table.expr)
    path = save_bank(bank, tmp_path / "b.npz")
    back = load_bank(path)
    np.testing.assert_array_equal(back.embeddings, bank.embeddings)
    assert back.genes == bank.genes and back.fingerprint == ck.fingerprint
    assert list(back.spot_ids[:2]) == ["S1_1x1", "S1_1x2"]
    back.check_compatible(ck.fingerprint, ck.preprocess.genes)
    with pytest.raises(FingerprintMismatch, match="rebuild the bank"):
        back.check_compatible("0" * 16)
    pred = retrieve(
        np.random.default_rng(0).normal(size=(3, 256)).astype(np.float32),
        back.embeddings,
        back.expressions,
        10,
    )
    assert pred.shape == (3, len(bank.genes))


def test_sequence_context_is_per_section(ckpt, synthetic):
    """Batch context embeds runs of `seq_len` spots of one section: the first run of S2
    must not depend on S1's spots."""
    ck = load_checkpoint(ckpt)
    both = build_table(read_her2st(synthetic, ["S1", "S2"]), ck.preprocess)
    only = build_table(read_her2st(synthetic, ["S2"]), ck.preprocess)
    e_both = spot_embeddings(ck.model, both, seq_len=32)
    e_only = spot_embeddings(ck.model, only, seq_len=32)
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
    from mclx.config import ModelCfg, PreprocessCfg
    from mclx.models import create_model

    net = create_model(ModelCfg.for_model("stnet", encoder="tiny_cnn", n_genes=40))
    pre = PreprocessCfg(genes=tuple(f"GENE{i:03d}" for i in range(40)))
    save_checkpoint(tmp_path / "s.pt", net, preprocess=pre)
    with pytest.raises(FormatError, match="needs no bank"):
        build_bank(tmp_path / "s.pt", synthetic)
