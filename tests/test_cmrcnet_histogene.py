"""CMRCNet and HisToGene (issue #13): their losses against the formulas, the mask, the
reconstruction gradient, shared and separate fusion layers, HisToGene's section-level
prediction, their recipes, and both through train / evaluate / export (ONNX parity,
the ViT encoder included) / infer."""

from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pytest
import torch
from helpers import run_cli, tiny_options
from helpers.oracles import image_outputs_f64, knn_predict

from mclx.checkpoint import load_checkpoint
from mclx.config import ModelCfg, PreprocessCfg, TrainCfg
from mclx.errors import DataError
from mclx.models import (
    IMAGENET,
    bleep_loss,
    create_encoder,
    create_model,
    model_cfg,
    preprocess_defaults,
    train_cfg,
)
from mclx.models.cmrcnet import FusionLayer
from mclx.training.train import _augment, lr_at


def _cmrcnet(**kw):
    torch.manual_seed(0)
    cfg = model_cfg("cmrcnet", encoder="vit_tiny", n_genes=12, embed_dim=32, heads=4, **kw)
    return create_model(cfg, encoder_weights=None)


def _np_log_softmax(a):
    a = a - a.max(1, keepdims=True)
    return a - np.log(np.exp(a).sum(1, keepdims=True))


def test_soft_target_loss_per_spot_against_its_formula():
    """BLEEP's / CMRCNet's loss on a hand-made batch, each spot's term in float64."""
    spot = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5], [1.0, 1.0, 0.0], [-1.0, 0.2, 0.3]])
    img = np.array([[0.9, 0.1, 0.4], [0.2, 0.8, -0.1], [0.5, 0.4, 0.3], [-0.7, 0.0, 0.9]])
    logits = spot @ img.T
    sim = (img @ img.T + spot @ spot.T) / 2
    targets = np.exp(sim - sim.max(1, keepdims=True))
    targets /= targets.sum(1, keepdims=True)
    rows = -(targets * _np_log_softmax(logits)).sum(1)
    cols = -(targets.T * _np_log_softmax(logits.T)).sum(1)
    expected = (rows + cols) / 2
    got = bleep_loss(torch.tensor(spot), torch.tensor(img), 1.0, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert float(bleep_loss(torch.tensor(spot), torch.tensor(img))) == pytest.approx(
        expected.mean(), rel=1e-12
    )


def test_total_loss_is_mean_log1p_contrastive_plus_log1p_reconstruction():
    model = _cmrcnet().train()
    tokens, expr = torch.randn(6, 5, 64), torch.rand(6, 12)
    torch.manual_seed(3)
    contrastive, recon = model.losses(tokens, expr)
    torch.manual_seed(3)  # the same mask and dropout
    total = model.loss(tokens, expr, None)
    c, r = contrastive.detach().double().numpy(), float(recon.detach())
    assert contrastive.shape == (6,)
    assert float(total.detach()) == pytest.approx(np.log1p(c).mean() + math.log1p(r), rel=1e-6)


def test_mask_keeps_about_half_of_the_elements_and_is_off_in_eval():
    model = _cmrcnet().train()
    x = torch.full((64, 50, 256), 3.0)
    torch.manual_seed(0)
    masked = model.mask_tokens(x)
    kept = masked != 0
    assert set(masked.unique().tolist()) == {0.0, 3.0}  # no rescaling of kept elements
    assert float(kept.float().mean()) == pytest.approx(0.5, abs=0.005)  # 819,200 draws
    per_token = kept.float().mean(-1)  # element-wise, not whole tokens: none all or nothing
    assert 0.25 < float(per_token.min()) and float(per_token.max()) < 0.75
    model.eval()
    assert torch.equal(model.mask_tokens(x), x)


def test_reconstruction_gradient_reaches_the_image_encoder():
    model = _cmrcnet().train()
    images = torch.rand(4, 3, 64, 64)
    _, recon = model.losses(model.image_features(images), torch.rand(4, 12))
    recon.backward()
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "pos_embed"):
        grad = model.image_encoder.get_parameter(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert float(model.token_projection.weight.grad.abs().sum()) > 0  # the masked path
    assert model.spot_projection.projection.weight.grad is None  # not in this loss


def test_fusion_layers_shared_by_default_or_separate():
    shared, separate = _cmrcnet(), _cmrcnet(fusion_shared=False)
    assert shared.cfg.fusion_shared and shared.cfg.depth == 2
    assert len(shared.fusion) == 1 and shared.fusion_layers == [shared.fusion[0]] * 2
    assert separate.fusion_layers == [separate.fusion[0], separate.fusion[1]]
    one = sum(p.numel() for p in FusionLayer(32, 4).parameters())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(separate) - count(shared) == one
    w0, w1 = (f.attn.qkv.weight for f in separate.fusion)
    assert not torch.equal(w0, w1)  # each its own initialisation
    # shared: the one layer applied twice, its gradient the sum of both applications
    shared.eval()
    tokens, expr = torch.randn(3, 5, 64), torch.rand(3, 12)
    genes = shared.gene_tokens(expr)
    latent, _ = shared.cross_attention(shared.token_projection(tokens), genes, genes)
    layer = shared.fusion[0]
    expected = layer(layer(latent, genes), genes).mean(1)
    torch.testing.assert_close(shared.reconstruct(tokens, expr), expected)


def test_cmrcnet_defaults_follow_its_reference_code():
    cfg = model_cfg("cmrcnet")
    assert (cfg.encoder, cfg.k, cfg.weighting, cfg.pos_embed) == ("vit_b32", 50, "mean", False)
    assert (cfg.embed_dim, cfg.depth, cfg.heads, cfg.mask_keep) == (256, 2, 8, 0.5)
    t = train_cfg("cmrcnet")
    assert (t.optimizer, t.lr, t.min_lr, t.weight_decay) == ("adamw", 1e-4, 1e-5, 1e-3)
    assert (t.epochs, t.batch_size, t.augmentation, t.val_fraction) == (60, 64, "dihedral", 0)
    assert preprocess_defaults("cmrcnet") == IMAGENET and preprocess_defaults("mclstexp") == {}
    vit = create_encoder("vit_b32", weights=None)
    assert (vit.num_features, len(vit.blocks), vit.blocks[0].attn.heads) == (768, 8, 8)
    assert vit.patch_embed.patch == 32 and vit.pos_embed.shape == (1, 50, 768)
    with torch.no_grad():
        assert vit.forward_tokens(torch.rand(1, 3, 224, 224)).shape == (1, 50, 768)
    h = model_cfg("histogene")
    assert (h.encoder, h.embed_dim, h.depth, h.heads, h.dim_head) == ("patch112", 1024, 8, 16, 64)
    assert (h.context, h.k) == ("section", 0)
    assert (train_cfg("histogene").lr, train_cfg("histogene").epochs) == (1e-5, 100)


def test_cosine_schedule_and_dihedral_augmentation():
    cfg = TrainCfg(epochs=4, lr=1e-4, min_lr=1e-5)
    want = [1e-5 + 9e-5 * (1 + math.cos(math.pi * (e + 1) / 4)) / 2 for e in range(4)]
    assert [lr_at(cfg, e) for e in range(4)] == pytest.approx(want, rel=1e-12)
    assert lr_at(cfg, 3) == pytest.approx(1e-5) and lr_at(TrainCfg(lr=3e-4), 7) == 3e-4
    img = torch.arange(3 * 4 * 4, dtype=torch.uint8).view(1, 3, 4, 4)
    group = [torch.rot90(f, r, dims=(-2, -1)) for f in (img[0], img[0].flip(-1)) for r in range(4)]
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        out = _augment(img, "dihedral")[0]
        match = [i for i, g in enumerate(group) if torch.equal(out, g)]
        assert len(match) == 1  # one of the square's 8 symmetries, pixels untouched
        seen.add(match[0])
    assert len(seen) >= 6


def _histogene(**kw):
    torch.manual_seed(0)
    cfg = model_cfg(
        "histogene", n_genes=7, embed_dim=32, depth=2, heads=2, dim_head=16, pos_size=(6, 5),
        dropout=0.0, **kw,
    )  # fmt: skip
    return create_model(cfg, encoder_weights=None)


def test_histogene_predicts_a_section_and_learns():
    model = _histogene().eval()
    images = torch.rand(9, 3, 128, 128)
    pos = torch.tensor([[i % 6, i // 6] for i in range(9)])
    with torch.no_grad():
        out = model(images, pos)
        assert out.shape == (9, 7) and model.image_encoder.num_features == 3 * 112 * 112
        perm = torch.randperm(9)
        torch.testing.assert_close(model(images[perm], pos[perm]), out[perm])  # a set of spots
        moved = pos.clone()
        moved[0] = torch.tensor([5, 4])
        assert not torch.allclose(model(images, moved)[0], out[0])  # positions matter
        alone = model(images[:1], pos[:1])
    assert not torch.allclose(alone, out[:1])  # each spot sees its section
    with pytest.raises(DataError, match="positional tables"):
        model(images[:2], torch.tensor([[6, 0], [0, 0]]))
    with pytest.raises(ValueError, match="whole sections"):
        _histogene(context="batch")
    model.train()
    feats, expr = model.image_encoder(images), torch.rand(9, 7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = float(model.loss(feats, expr, pos).detach())
    for _ in range(5):
        opt.zero_grad()
        model.loss(feats, expr, pos).backward()
        opt.step()
    assert float(model.loss(feats, expr, pos).detach()) < before


def test_checkpoints_without_the_new_fields_still_load(tmp_path):
    """A version-2 file (no fusion_shared / mask_keep) loads with their defaults."""
    from mclx.checkpoint import save_checkpoint
    from mclx.config import PreprocessCfg

    net = create_model(ModelCfg(encoder="tiny_cnn", n_genes=4, pos_size=(3, 3)))
    path = tmp_path / "v2.pt"
    save_checkpoint(path, net, preprocess=PreprocessCfg(genes=("a", "b", "c", "d")))
    payload = torch.load(path, weights_only=True)
    for key in ("fusion_shared", "mask_keep"):
        del payload["model"][key]
    payload["format_version"] = 2
    torch.save(payload, path)
    assert load_checkpoint(path).model_cfg.fusion_shared is True


@pytest.fixture(scope="module")
def cmrcnet_run(synthetic, tmp_path_factory):
    """A tiny-ViT CMRCNet trained with `mclx train` (frozen encoder, validation split),
    its bank of S1 and S2 and its ONNX export, all through the command line."""
    capsys = _NoCapture()
    d = tmp_path_factory.mktemp("cmrcnet")
    ck, bank = d / "m.pt", d / "bank.npz"
    options = tiny_options(synthetic, model="cmrcnet", encoder="vit_tiny", epochs=3)
    for args in (
        ["train", "--data", synthetic, "--sections", "S1,S2", *options, "--val-fraction",
         "0.25", "--embed-dim", "32", "-q", "--out", ck],
        ["bank", "build", "--ckpt", ck, "--data", synthetic, "--sections", "S1,S2", "--out", bank],
        ["export", "--ckpt", ck, "--calib-data", synthetic, "-q"],
    ):  # fmt: skip
        res = run_cli(capsys, args)
        assert res.returncode == 0, res.stderr
    return ck, bank


class _NoCapture:
    """``run_cli`` in a module fixture: no capsys there, output goes to the terminal."""

    def readouterr(self):
        return "", ""


def test_cmrcnet_trains_with_its_recipe_and_exports_its_vit(cmrcnet_run):
    ck_path, bank_path = cmrcnet_run
    ck = load_checkpoint(ck_path)
    assert (ck.model_cfg.name, ck.model_cfg.encoder, ck.model_cfg.embed_dim) == (
        "cmrcnet", "vit_tiny", 32,
    )  # fmt: skip
    assert (ck.preprocess.mean, ck.preprocess.std) == (IMAGENET["mean"], IMAGENET["std"])
    train = ck.provenance["train"]
    assert (train["optimizer"], train["min_lr"], train["augmentation"]) == (
        "adamw", 1e-5, "dihedral",
    )  # fmt: skip
    assert (train["epochs"], train["val_fraction"]) == (3, 0.25)
    assert len(ck.provenance["val_history"]) == 3
    best = ck.provenance["best_epoch"]
    assert ck.provenance["val_history"][best - 1] == min(ck.provenance["val_history"])
    report = json.loads(ck_path.with_name("m.export.json").read_text())
    assert report["onnx"]["max_rel_err"] < 1e-4 and report["onnx"]["min_cosine"] > 0.99999
    from mclx.bank import load_bank

    bank = load_bank(bank_path)
    assert (bank.k, bank.weighting, bank.model) == (50, "mean", "cmrcnet")
    # the bank's keys are the gene projections of the spots' expression
    table_expr = torch.as_tensor(bank.expressions[:5])
    with torch.no_grad():
        want = ck.model.spot_projection(table_expr).numpy()
    np.testing.assert_allclose(bank.embeddings[:5], want, rtol=1e-4, atol=1e-5)


def test_mclx_infer_runs_cmrcnet_through_onnx_runtime(cmrcnet_run, synthetic, tmp_path, capsys):
    from mclx.bank import load_bank
    from mclx.data.her2st import read_section
    from mclx.data.patches import extract_patches
    from mclx.data.slide import load_image

    ck_path, bank_path = cmrcnet_run
    s3 = read_section(synthetic, "S3")
    out = tmp_path / "s3.h5ad"
    spots = synthetic / "data" / "ST-spotfiles" / "S3_selection.tsv"
    res = run_cli(capsys, [
        "infer", s3.uns["image_path"], "--bank", bank_path, "--backend", "onnxruntime",
        "--spots", spots, "--out", out, "-q",
    ])  # fmt: skip
    assert res.returncode == 0, res.stderr
    pred = ad.read_h5ad(out)
    assert (pred.uns["mclx"]["backend"], pred.uns["mclx"]["k"]) == ("onnxruntime", 50)
    pred = pred[[i.removeprefix("S3_") for i in s3.obs_names]]
    ck, bank = load_checkpoint(ck_path), load_bank(bank_path)
    patches = extract_patches(load_image(s3.uns["image_path"]), s3.obsm["spatial"], 224)
    queries = image_outputs_f64(ck.model, patches, ck.preprocess)  # ImageNet mean / std
    want = knn_predict(queries, bank.embeddings, bank.expressions, 50, weighting="mean")
    sure = want.sure(3e-6)
    assert sure.mean() > 0.9
    np.testing.assert_allclose(pred.X[sure], want.pred[sure], rtol=1e-4, atol=1e-5)


def test_histogene_through_the_command_line(synthetic, tmp_path, capsys):
    """Train (tiny dims), export with parity (two inputs: images and positions), score
    the checkpoint without a bank, and cross-validate."""
    ck = tmp_path / "h.pt"
    dims = ["--embed-dim", "32", "--depth", "1", "--heads", "2"]
    options = tiny_options(
        synthetic, model="histogene", encoder="patch112", epochs=2, batch_size=None
    )
    steps = [
        ["train", "--data", synthetic, "--sections", "S1,S2", *options, *dims, "-q", "--out", ck],
        ["export", "--ckpt", ck, "--calib-data", synthetic, "-q"],
        ["evaluate", "--data", synthetic, "--ckpt", ck, "--sections", "S3", "--out",
         tmp_path / "s3.json"],
        ["evaluate", "--data", synthetic, "--sections", "S1,S2", *options, *dims, "-q",
         "--out", tmp_path / "cv.json"],
    ]  # fmt: skip
    for args in steps:
        res = run_cli(capsys, args)
        assert res.returncode == 0, res.stderr
    loaded = load_checkpoint(ck)
    cfg = loaded.model_cfg
    assert (cfg.name, cfg.encoder, cfg.embed_dim, cfg.depth, cfg.heads) == (
        "histogene", "patch112", 32, 1, 2,
    )  # fmt: skip
    assert loaded.provenance["train"]["lr"] == 1e-5 and not loaded.provenance["train"]["augment"]
    report = json.loads((tmp_path / "h.export.json").read_text())
    assert report["onnx"]["max_rel_err"] < 1e-4
    scored = json.loads((tmp_path / "s3.json").read_text())
    cv = json.loads((tmp_path / "cv.json").read_text())
    assert set(scored["sections"]["S3"]) >= {"pcc_acg", "pcc_heg", "pcc_hvg", "mse"}
    assert cv["config"]["model"]["name"] == "histogene" and set(cv["sections"]) == {"S1", "S2"}
    assert "PCC(HVG)" in res.stdout
    # the ONNX graph predicts the section as the model does, positions included
    from mclx.data.dataset import build_table
    from mclx.data.her2st import read_section
    from mclx.data.patches import section_patches
    from mclx.inference.encoders import OnnxRuntimeEncoder, TorchEncoder

    s3 = read_section(synthetic, "S3")
    patches = section_patches(s3, 224)
    pos = build_table({"S3": s3}, loaded.preprocess).pos
    onnx = OnnxRuntimeEncoder(tmp_path / "h.onnx")
    np.testing.assert_allclose(
        onnx(patches, pos), TorchEncoder(loaded)(patches, pos), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="array positions"):
        onnx(patches)
    res = run_cli(capsys, ["export", "--ckpt", ck, "--int8", "-q"])
    assert res.returncode == 1 and "only FP32 ONNX is offered, not onnx-int8" in res.stderr


def test_token_cache_is_per_resolution_and_pools_to_the_encoder_features(synthetic, monkeypatch):
    """The frozen-feature cache after the merge with main's µm/px resampling: tokens and
    pooled features of one section at one resolution are encoded once (pooled = the mean
    of the cached tokens = the encoder's own pooled output); another µm/px cuts other
    tissue and is encoded on its own."""
    import dataclasses

    from mclx.data.patches import section_patches
    from mclx.data.readers import open_data
    from mclx.inference import embed
    from mclx.training.features import PatchCache

    adatas = open_data(synthetic).read(["S1"], with_image=True)
    native = adatas["S1"].uns["mpp"]
    assert native
    encoder = _cmrcnet().image_encoder
    pre = dataclasses.replace(PreprocessCfg(), mpp=native, **preprocess_defaults("cmrcnet"))
    coarse = dataclasses.replace(pre, mpp=native * 2)
    calls = []
    encode = embed.encode_features

    def counting(enc, patches, p, **kw):
        calls.append((len(patches), kw.get("tokens", False)))
        return encode(enc, patches, p, **kw)

    monkeypatch.setattr(embed, "encode_features", counting)
    cache = PatchCache(adatas, 224)
    tokens = cache.features(encoder, "S1", pre, tokens=True)
    n = adatas["S1"].n_obs
    assert tokens.shape[0] == n and tokens.ndim == 3 and tokens.shape[1] > 1
    pooled = cache.features(encoder, "S1", pre)
    assert calls == [(n, True)]  # pooled features came from the cached tokens
    np.testing.assert_allclose(pooled, tokens.mean(axis=1), rtol=1e-6)
    own = encode(encoder, section_patches(adatas["S1"], 224, native), pre)
    np.testing.assert_allclose(pooled, own, rtol=1e-4, atol=1e-5)
    other = cache.features(encoder, "S1", coarse)
    assert calls == [(n, True), (n, False)]  # another resolution: encoded again
    assert not np.allclose(other, pooled, atol=1e-3)
    assert not np.array_equal(cache.patches("S1", coarse.mpp), cache.patches("S1", pre.mpp))
