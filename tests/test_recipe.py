"""One training recipe for `train` and `evaluate`: the drifts it removed stay removed.

Each test here failed before `mclx.training.recipe` (commit b303ced): `evaluate` ignored
`--log-base`, sized the positional tables from its bank sections instead of the data
folder, took the µm/px median over the held-out section too, and banks read the spot
encoder's attention length from the provenance instead of the model config.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from mclx.config import TrainCfg
from mclx.data.her2st import read_her2st
from mclx.evaluation.evaluate import cross_validate
from mclx.training.recipe import Recipe, pos_size

FAST = TrainCfg(epochs=2, batch_size=32, freeze_encoder=True, lr=1e-3)


@pytest.fixture(scope="module")
def varied(synthetic, tmp_path_factory):
    """The synthetic data plus a bigger image-less section S9 (array up to 14 x 12), with
    S2's spots 0.8x as far apart in pixels (so its µm/px differs from S1's)."""
    from mclx.data.synthetic import write_synthetic_her2st

    root = tmp_path_factory.mktemp("varied") / "data_root"
    shutil.copytree(synthetic, root)
    write_synthetic_her2st(root / "s9", sections=(), no_image=("S9",), grid=(14, 12))
    for name in ("ST-cnts/S9.tsv.gz", "ST-spotfiles/S9_selection.tsv"):
        shutil.move(root / "s9" / "data" / name, root / "data" / name)
    spots = root / "data" / "ST-spotfiles" / "S2_selection.tsv"
    df = pd.read_csv(spots, sep="\t")
    df[["pixel_x", "pixel_y"]] *= 0.8
    df.to_csv(spots, sep="\t", index=False)
    return root


def recipe(root, **kw) -> Recipe:
    return Recipe(
        overrides={"encoder": "tiny_cnn"},
        train=FAST,
        genes_file=root / "genes.txt",
        encoder_weights=None,
        **kw,
    )


def test_positional_tables_cover_the_data_folder_in_train_and_evaluate(varied, tmp_path):
    from helpers import mclx

    out = tmp_path / "m.pt"
    res = mclx(
        "train", "--data", varied, "--sections", "S1,S2", "--encoder", "tiny_cnn",
        "--encoder-weights", "none", "--genes", varied / "genes.txt", "--freeze-encoder",
        "--epochs", 2, "--batch-size", 32, "-q", "--out", out,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    trained = torch.load(out, weights_only=True)["model"]["pos_size"]
    cv = cross_validate(varied, recipe(varied), sections=["S1", "S2"], k=20, progress=False)
    assert tuple(trained) == (15, 13)  # S9's array reaches x = 14, y = 12
    assert tuple(cv["config"]["model"]["pos_size"]) == tuple(trained)
    assert pos_size(varied) == (15, 13)


def test_evaluate_estimates_mpp_on_training_sections_only(varied):
    adatas = read_her2st(varied, ["S1", "S2"], with_image=True)
    mpp = {s: a.uns["mpp"] for s, a in adatas.items()}
    assert mpp["S2"] == pytest.approx(mpp["S1"] / 0.8, rel=0.01)
    # the last fold holds out S2: its model was trained on S1, so it has S1's µm/px
    cv = cross_validate(varied, recipe(varied), sections=["S1", "S2"], k=20, progress=False)
    assert cv["config"]["preprocess"]["mpp"] == pytest.approx(mpp["S1"], rel=1e-9)


def test_evaluate_applies_log_base(synthetic, tmp_path):
    from helpers import mclx

    runs = {}
    for base in ("10", "e"):
        out = tmp_path / f"ev_{base}.json"
        res = mclx(
            "evaluate", "--data", synthetic, "--sections", "S1,S2", "--encoder", "tiny_cnn",
            "--encoder-weights", "none", "--genes", synthetic / "genes.txt",
            "--freeze-encoder", "--epochs", 2, "--batch-size", 32, "--log-base", base,
            "--k", 20, "-q", "--out", out,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        runs[base] = json.loads(out.read_text())
    assert runs["e"]["config"]["preprocess"]["log_base"] == "e"
    # ln(1 + x) = 2.30 log10(1 + x): squared errors of the same fit grow ~5.3-fold
    ratio = runs["e"]["mean"]["mse"] / runs["10"]["mean"]["mse"]
    assert 3.0 < ratio < 8.0, ratio


def test_bank_uses_the_model_configs_attention_length(synthetic, tmp_path):
    """A bank embeds each section's spots in runs of `cfg.seq_len` (the training batch
    size), whatever the provenance says; checked against the model's own modules."""
    from mclx.bank import build_bank
    from mclx.checkpoint import load_checkpoint, save_checkpoint
    from mclx.data.dataset import build_table
    from mclx.training.features import PatchCache
    from mclx.training.run import train_model

    r = Recipe(
        overrides={"encoder": "tiny_cnn", "context": "batch"},
        train=TrainCfg(epochs=1, batch_size=16, freeze_encoder=True),
        genes_file=synthetic / "genes.txt",
        encoder_weights=None,
    )
    adatas = read_her2st(synthetic, ["S1", "S2"], with_image=True)
    pre, net = r.setup(synthetic, adatas, ["S1", "S2"])
    train_model(net, PatchCache(adatas, pre.patch_size), ["S1", "S2"], pre, r.train, progress=False)
    assert net.cfg.seq_len == 16
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, net, preprocess=pre, provenance={"train": {"batch_size": 7}})
    bank = build_bank(ck, synthetic, sections=["S4"])
    model = load_checkpoint(ck).model.double()
    table = build_table(read_her2st(synthetic, ["S4"]), pre)
    expected = np.concatenate(
        [
            model.embed_spots(
                torch.as_tensor(table.expr[s : s + 16], dtype=torch.float64),
                torch.as_tensor(table.pos[s : s + 16]),
            ).detach().numpy()
            for s in range(0, len(table), 16)
        ]
    )  # fmt: skip
    np.testing.assert_allclose(bank.embeddings, expected, rtol=1e-4, atol=1e-5)


def test_version_1_checkpoint_takes_seq_len_from_its_provenance(tmp_path):
    from mclx.checkpoint import load_checkpoint, save_checkpoint
    from mclx.config import PreprocessCfg
    from mclx.models import create_model, model_cfg

    net = create_model(model_cfg("mclstexp", encoder="tiny_cnn", n_genes=6, pos_size=(3, 3)))
    path = tmp_path / "v1.pt"
    pre = PreprocessCfg(genes=tuple(f"g{i}" for i in range(6)))
    save_checkpoint(path, net, preprocess=pre, provenance={"train": {"batch_size": 48}})
    payload = torch.load(path, weights_only=True)
    del payload["model"]["seq_len"]
    payload["format_version"] = 1
    torch.save(payload, path)
    assert load_checkpoint(path).model_cfg.seq_len == 48


def test_evaluate_refuses_k_above_a_folds_bank_before_training(synthetic, monkeypatch):
    import mclx.evaluation.evaluate

    def no_training(*a, **kw):
        raise AssertionError("trained before checking k")

    monkeypatch.setattr(mclx.evaluation.evaluate, "train_model", no_training)
    with pytest.raises(ValueError, match=r"k=200 is larger than the bank of the fold .*100 spots"):
        cross_validate(synthetic, recipe(synthetic), sections=["S1", "S2"], progress=False)
    with pytest.raises(AssertionError, match="trained before"):  # k that fits: it trains
        cross_validate(synthetic, recipe(synthetic), sections=["S1", "S2"], k=100)


# the fields `--recipe default` may change from `--recipe paper` (ModelCfg fields)
RECIPE_CHANGES = {"feature_norm", "temperature", "context_fov_um"}
ONE_EPOCH = {"sections": "S1,S2", "epochs": 1, "batch_size": 32}
FROZEN_ARGS = ["--encoder", "tiny_cnn", "--encoder-weights", "none", "--freeze-encoder"]


def _recipe_of(*args):
    """The Recipe and model/train configs that `mclx train ARGS` would use."""
    import dataclasses

    from mclx.cli.model_options import ModelOptions
    from mclx.cli.train import train
    from mclx.models import model_cfg

    ctx = train.make_context("train", ["--out", "x.pt", "--genes", "g.txt", *map(str, args)])
    fields = {f.name for f in dataclasses.fields(ModelOptions)}
    r = ModelOptions(**{k: v for k, v in ctx.params.items() if k in fields}).recipe()
    return r, model_cfg(r.model, n_genes=5, **r.model_overrides()), r.train


def test_recipe_paper_is_the_old_configuration_field_for_field():
    """`--recipe paper` builds what the options built before `--recipe` existed: the
    model's published ModelCfg and TrainCfg with only the given options changed."""
    from mclx.config import TrainCfg, to_dict
    from mclx.models import model_cfg, train_cfg

    for model in ("mclstexp", "bleep", "stnet", "ridge", "knn"):
        r, cfg, train = _recipe_of("--recipe", "paper", "--model", model, *FROZEN_ARGS)
        assert r.name == "paper"
        assert to_dict(cfg) == to_dict(model_cfg(model, n_genes=5, encoder="tiny_cnn"))
        old = {**to_dict(train_cfg(model)), "freeze_encoder": True}
        assert to_dict(train) == old, model
    r, cfg, train = _recipe_of("--recipe", "paper")  # fine-tuned: the reference recipe
    assert to_dict(cfg) == to_dict(model_cfg("mclstexp", n_genes=5))
    assert to_dict(train) == to_dict(TrainCfg())


def test_default_recipe_differs_from_paper_only_in_its_chosen_fields():
    from mclx.config import to_dict

    for model in ("mclstexp", "bleep", "stnet", "ridge", "knn"):
        for frozen in (FROZEN_ARGS, ["--encoder", "tiny_cnn"]):
            if model in ("ridge", "knn") and "--freeze-encoder" not in frozen:
                continue
            paper = _recipe_of("--recipe", "paper", "--model", model, *frozen)
            new = _recipe_of("--model", model, *frozen)  # --recipe default
            assert new[0].name == "default"
            a, b = to_dict(paper[1]), to_dict(new[1])
            changed = {k for k in a if a[k] != b[k]}
            assert changed <= RECIPE_CHANGES
            assert to_dict(paper[2]) == to_dict(new[2])  # no TrainCfg change (yet)
            want = set()
            if "--freeze-encoder" in frozen:
                want = {"mclstexp": {"feature_norm", "temperature", "context_fov_um"},
                        "bleep": {"feature_norm"}}  # fmt: skip
                want = want.get(model, set())
            assert changed == want, (model, frozen)
            if "temperature" in changed:
                assert (paper[1].temperature, new[1].temperature) == (1.0, 10.0)
            if "context_fov_um" in changed:
                assert (paper[1].context_fov_um, new[1].context_fov_um) == (0.0, 461.0)


def test_explicit_flags_override_the_recipe():
    _, cfg, _ = _recipe_of(*FROZEN_ARGS, "--no-standardize-features")
    assert cfg.feature_norm is False
    _, cfg, _ = _recipe_of("--recipe", "paper", *FROZEN_ARGS, "--standardize-features")
    assert cfg.feature_norm is True


def test_temperature_option_reaches_the_loss():
    """--temperature (a #17 ablation) sets ModelCfg.temperature, and the model's loss
    divides its logits by it: clip_loss at T equals the loss of embeddings scaled 1/T."""
    import torch

    from mclx.models.mclstexp import clip_loss

    _, cfg, _ = _recipe_of(*FROZEN_ARGS, "--temperature", "0.25")
    assert cfg.temperature == 0.25
    _, cfg, _ = _recipe_of("--recipe", "paper", *FROZEN_ARGS)
    assert cfg.temperature == 1.0
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert torch.allclose(clip_loss(a, b, 0.25), clip_loss(a / 0.25, b, 1.0))
    assert not torch.allclose(clip_loss(a, b, 0.25), clip_loss(a, b, 1.0))


def test_recipe_is_recorded_in_checkpoint_and_results(synthetic, tmp_path, capsys):
    from helpers.cli import run_cli

    from mclx.checkpoint import load_checkpoint

    args = ["--data", synthetic, *FROZEN_ARGS, "--genes", synthetic / "genes.txt"]
    args += ["--epochs", 1, "--batch-size", 32, "-q"]
    for name in ("paper", "default"):
        out = tmp_path / f"{name}.pt"
        argv = ["train", *args, "--sections", "S1,S2", "--recipe", name, "--out", out]
        res = run_cli(capsys, argv)
        assert res.returncode == 0, res.stderr
        ck = load_checkpoint(out)
        assert ck.provenance["recipe"] == name
        assert ck.model_cfg.feature_norm is (name == "default")
        wide = (461.0,) if name == "default" else ()  # the synthetic images' µm/px is known
        assert ck.preprocess.views_um == wide and ck.model_cfg.context_fov_um == sum(wide)
    out = tmp_path / "ev.json"
    res = run_cli(capsys, ["evaluate", *args, "--sections", "S1,S2", "--k", 20, "--out", out])
    assert res.returncode == 0, res.stderr
    cfg = json.loads(out.read_text())["config"]
    assert cfg["recipe"] == "default" and cfg["model"]["feature_norm"] is True


def test_default_field_of_view_needs_every_training_sections_scale(synthetic):
    """The recipe's 461 µm field of view is cut on each section's µm/px: with one
    training section of unknown scale it is left out with a warning (the user's own
    --context-fov is kept, and refused where the crops are cut); --context-fov 0 turns
    it off; the model is built with what the preprocessing decided."""
    import dataclasses
    import warnings

    from mclx.data.readers import open_data

    adatas = open_data(synthetic).read(["S1", "S2"], with_image=True)
    r, _, _ = _recipe_of(*FROZEN_ARGS)
    assert r.views(adatas) == (461.0,)
    assert _recipe_of(*FROZEN_ARGS, "--context-fov", "0")[0].views(adatas) == ()
    assert _recipe_of(*FROZEN_ARGS, "--context-fov", "300")[0].views(adatas) == (300.0,)
    adatas["S2"].uns["mpp"] = None
    with pytest.warns(UserWarning, match="section S2: µm/px unknown.*461 µm field of view"):
        assert r.views(adatas) == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _recipe_of(*FROZEN_ARGS, "--context-fov", "300")[0].views(adatas) == (300.0,)
    r = dataclasses.replace(r, genes_file=str(synthetic / "genes.txt"))
    pre, model = r.setup(synthetic, {"S1": adatas["S1"], "S2": adatas["S2"]}, ["S1"])
    assert pre.views_um == (461.0,) and model.cfg.context_fov_um == 461.0  # S1 has its scale
    with pytest.warns(UserWarning, match="left out"):
        pre, model = r.setup(synthetic, adatas, ["S1", "S2"])
    assert pre.views_um == () and model.cfg.context_fov_um == 0.0
    assert model.image_projection.projection.in_features == model.image_encoder.num_features


def test_recipe_names_are_the_config_literal():
    import typing

    from mclx.config import RecipeName
    from mclx.training.recipe import RECIPES

    assert set(typing.get_args(RecipeName)) == set(RECIPES)


def test_dihedral_views_are_the_eight_symmetries_of_the_square():
    from mclx.training.features import dihedral

    p = np.random.default_rng(0).integers(0, 255, (2, 6, 6, 3), dtype=np.uint8)
    views = [dihedral(p, i) for i in range(8)]
    assert np.array_equal(views[0], p)
    assert len({v.tobytes() for v in views}) == 8  # all distinct on a random patch
    t = torch.as_tensor(p).permute(0, 3, 1, 2)  # as torch turns and flips them
    for i, v in enumerate(views):
        ref = torch.rot90(t, i % 4, dims=(-2, -1))
        ref = ref.flip(-1) if i >= 4 else ref
        assert np.array_equal(v, ref.permute(0, 2, 3, 1).numpy()), i


def test_feature_views_train_on_cached_dihedral_features(synthetic, tmp_path, capsys):
    """`--feature-views 8`: each training section's pooled features are cached for its
    8 views (view 0 = the patch as cut); training draws among them (other losses than
    with the one view), standardisation takes all views, and the checkpoint records it."""
    import dataclasses

    from helpers import tiny_recipe
    from helpers.cli import run_cli
    from helpers.models import tiny_train_args

    from mclx.checkpoint import load_checkpoint
    from mclx.inference.embed import encode_features
    from mclx.training.features import PatchCache, dihedral
    from mclx.training.run import train_model

    r = tiny_recipe(synthetic, epochs=2, batch_size=32, feature_norm=True)
    adatas = read_her2st(synthetic, ["S1", "S2"], with_image=True)
    histories = {}
    for views in (1, 8):
        pre, net = r.setup(synthetic, adatas, ["S1", "S2"])
        cache = PatchCache(adatas, pre.patch_size)
        cfg = dataclasses.replace(r.train, feature_views=views)
        histories[views], _ = train_model(net, cache, ["S1", "S2"], pre, cfg, progress=False)
    enc = net.image_encoder
    many = cache.features(enc, "S1", pre, views=8)
    assert many.shape[1] == 8
    np.testing.assert_array_equal(many[:, 0], cache.features(enc, "S1", pre))
    turned = dihedral(cache.patches("S1", pre.mpp), 5)
    np.testing.assert_allclose(many[:, 5], encode_features(enc, turned, pre), atol=1e-5)
    both = np.concatenate([many, cache.features(enc, "S2", pre, views=8)])
    both = both.reshape(-1, many.shape[2])
    np.testing.assert_allclose(net.feature_mean.numpy(), both.mean(0), rtol=1e-4, atol=1e-5)
    assert histories[1] != histories[8]
    args = tiny_train_args(synthetic, tmp_path / "v.pt", "--feature-views", 8, **ONE_EPOCH)
    assert run_cli(capsys, args).returncode == 0
    assert load_checkpoint(tmp_path / "v.pt").provenance["train"]["feature_views"] == 8
    args = tiny_train_args(synthetic, tmp_path / "f.pt", "--feature-views", 8, frozen=False)
    res = run_cli(capsys, args)
    assert res.returncode != 0 and "frozen encoder" in res.stderr
