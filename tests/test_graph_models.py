"""His2ST and THItoGene (issue #28): the spot graph against a hand-built grid and the
references' ``calcADJ`` loop, the graph layers and THItoGene's dynamic convolution and
capsule routing against independent formulations, both models' shapes, a gradient
step, and the exported ONNX graph on a section of another size than it was traced on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial import distance

from mclx.errors import DataError
from mclx.models import create_model, model_cfg, train_cfg
from mclx.models.graph import GATLayer, MeanGraphLayer, knn_adjacency
from mclx.models.thitogene import CapsuleEncoder, ODConv2d, squash
from mclx.training.train import lr_at

GRAPH_MODELS = ["his2st", "thitogene"]


def calc_adj(coord: np.ndarray, k: int, radius: float = 0.0) -> np.ndarray:
    """The references' ``calcADJ`` loop (cdist, argsort, the k after the spot itself),
    with a stable sort (ties to the lower index) and ``Grid`` pruning at ``radius``."""
    n = len(coord)
    adj = np.zeros((n, n), bool)
    for i in range(n):
        dist = distance.cdist(coord[i : i + 1], coord, "euclidean")[0]
        order = np.argsort(dist, kind="stable")
        for j in order[1 : k + 1]:
            if radius <= 0 or dist[j] <= radius:
                adj[i, j] = True
    return adj


def _grid(nx: int, ny: int) -> torch.Tensor:
    return torch.tensor([[x, y] for y in range(ny) for x in range(nx)])


def test_grid_neighbours_are_the_known_ones():
    pos = _grid(4, 4)  # row index = 4 y + x
    adj = knn_adjacency(pos, 4)
    idx = lambda x, y: 4 * y + x  # noqa: E731
    assert adj.sum(1).tolist() == [4] * 16 and not adj.diagonal().any()
    # an inner spot: its 4 orthogonal neighbours at distance 1
    assert set(adj[idx(1, 1)].nonzero().flatten().tolist()) == {
        idx(0, 1), idx(2, 1), idx(1, 0), idx(1, 2),
    }  # fmt: skip
    # a corner: 2 at distance 1, the diagonal at sqrt 2, then of the two at distance 2
    # the lower row index, (2, 0)
    assert set(adj[idx(0, 0)].nonzero().flatten().tolist()) == {
        idx(1, 0), idx(0, 1), idx(1, 1), idx(2, 0),
    }  # fmt: skip
    # His2ST's pruning: within 1.5 the corner keeps 3, an inner spot its 4
    pruned = knn_adjacency(pos, 4, radius=1.5)
    assert pruned[idx(0, 0)].sum() == 3 and pruned[idx(1, 1)].sum() == 4
    # a section of at most k spots: every other spot
    small = knn_adjacency(pos[:3], 4)
    assert small.tolist() == [[False, True, True], [True, False, True], [True, True, False]]


@pytest.mark.parametrize(("k", "radius"), [(4, 0.0), (4, 2.0), (8, 0.0), (3, 1.0)])
def test_adjacency_matches_the_reference_loop(k, radius):
    rng = np.random.default_rng(k)
    flat = rng.choice(30 * 20, size=150, replace=False)  # unique spots on a 30 x 20 grid
    coord = np.stack([flat % 30, flat // 30], axis=1)
    got = knn_adjacency(torch.as_tensor(coord), k, radius).numpy()
    np.testing.assert_array_equal(got, calc_adj(coord.astype(float), k, radius))


def test_mean_graph_layer_against_a_loop():
    torch.manual_seed(0)
    layer = MeanGraphLayer(5, 3).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    adj = knn_adjacency(_grid(3, 2), 2)
    w = layer.weight.detach().numpy()
    want = np.zeros((6, 3))
    for i in range(6):
        nb = adj[i].nonzero().flatten().numpy()
        h = np.maximum(w @ x.numpy()[nb].mean(0), 0)
        want[i] = h / max(np.linalg.norm(h), 1e-12)
    np.testing.assert_allclose(layer(x, adj).detach().numpy(), want, rtol=1e-10)


def test_gat_layer_against_a_loop():
    torch.manual_seed(0)
    layer = GATLayer(4, 3, dropout=0.0, alpha=0.01, concat=True).double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    adj = knn_adjacency(_grid(3, 2), 2)
    wh = x.numpy() @ layer.W.detach().numpy()
    a = layer.a.detach().numpy()[:, 0]
    want = np.zeros((6, 3))
    for i in range(6):
        nb = adj[i].nonzero().flatten().numpy()
        e = np.array([np.concatenate([wh[i], wh[j]]) @ a for j in nb])
        e = np.where(e > 0, e, 0.01 * e)
        att = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
        h = att @ wh[nb]
        want[i] = np.where(h > 0, h, np.expm1(h))  # ELU
    np.testing.assert_allclose(layer(x, adj).detach().numpy(), want, rtol=1e-10)


def test_odconv_is_the_references_grouped_convolution():
    torch.manual_seed(0)
    conv = ODConv2d(3, 16, 4).double().eval()
    x = torch.rand(3, 3, 28, 30, dtype=torch.float64)
    with torch.no_grad():
        a = conv.fc(x)
        ch = torch.sigmoid(conv.channel_fc(a))
        filt = torch.sigmoid(conv.filter_fc(a))
        sp = torch.sigmoid(conv.spatial_fc(a)).view(3, 1, 1, 1, 4, 4)
        ker = F.softmax(conv.kernel_fc(a).view(3, -1, 1, 1, 1, 1), dim=1)
        agg = (sp * ker * conv.weight.view(1, 4, 16, 3, 4, 4)).sum(1).view(-1, 3, 4, 4)
        out = F.conv2d((x * ch).reshape(1, -1, 28, 30), agg, stride=4, groups=3)
        want = out.view(3, 16, 7, 7) * filt
        torch.testing.assert_close(conv(x), want, rtol=1e-10, atol=1e-12)


def test_capsule_routing_is_the_references():
    torch.manual_seed(0)
    caps = CapsuleEncoder(28, 5, 6).double().eval()
    x = torch.rand(2, 16, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        prim = caps.primary(caps.convs(x))
        assert prim.shape[-2:] == (1, 1)  # 112 px: the reference's 9 x 9 depthwise kernel
        u = squash(prim.view(2, 16, 8))
        u = torch.einsum("...ji,kjiz->...kjz", u, caps.W)
        c = torch.einsum("...ij,...kj->...i", u, u)[..., None] / np.sqrt(6)
        c = torch.softmax(c, axis=1) + caps.b
        torch.testing.assert_close(caps(x), squash((u * c).sum(-2)), rtol=1e-10, atol=1e-12)
    assert CapsuleEncoder(28, 20, 64).primary.kernel_size == (9, 9)


def test_zinb_nll_is_the_zero_inflated_negative_binomial():
    from scipy.stats import nbinom

    from mclx.models.his2st import zinb_nll

    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, size=(5, 4)).astype(float)
    x[0, :2] = 0
    mean, disp = rng.uniform(0.5, 4, (5, 4)), rng.uniform(0.3, 5, (5, 4))
    pi, scale = rng.uniform(0.05, 0.6, (5, 4)), rng.uniform(0.5, 2, 5)
    mu = mean * scale[:, None]
    logp = nbinom.logpmf(x, disp, disp / (disp + mu))
    want = np.where(x == 0, -np.log(pi + (1 - pi) * np.exp(logp)), -np.log(1 - pi) - logp)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    got = zinb_nll(t(x), t(mean), t(disp), t(pi), t(scale))
    assert float(got) == pytest.approx(want.mean(), rel=1e-8)


def test_his2st_trains_on_the_raw_counts_the_loop_hands_it():
    from mclx.config import PreprocessCfg, TrainCfg
    from mclx.data.dataset import SpotTable
    from mclx.training.train import fit

    model = _tiny("his2st", encoder="tiny_cnn")
    assert model.reads_counts and model.cfg.zinb == 0.25
    n, rng = 12, np.random.default_rng(0)
    counts = rng.poisson(2.0, (n, 7)).astype(np.float32)
    table = SpotTable(
        expr=np.log10(1 + counts), pos=_grid(6, 2).numpy(), coords=np.zeros((n, 2)),
        section=np.full(n, "S", dtype=object), obs_names=np.arange(n).astype(str),
        counts=counts,
    )  # fmt: skip
    feats = torch.randn(n, 64)
    seen = []
    loss = model.loss
    model.loss = lambda *a: seen.append(a[3]) or loss(*a)
    cfg = TrainCfg(epochs=1, freeze_encoder=True, augment=False)
    fit(model, table, cfg, PreprocessCfg(), features=feats.numpy(), progress=False)
    assert len(seen) == 1 and sorted(seen[0].sum(1).tolist()) == sorted(counts.sum(1).tolist())
    with torch.no_grad():
        mse = float(loss(feats, torch.as_tensor(table.expr), _grid(6, 2)))
        both = float(loss(feats, torch.as_tensor(table.expr), _grid(6, 2), torch.tensor(counts)))
    assert both > mse  # a negative log-likelihood of counts is positive
    table.counts = None
    with pytest.raises(ValueError, match="raw counts"):
        fit(model, table, cfg, PreprocessCfg(), features=feats.numpy(), progress=False)


def test_his2st_self_distillation_is_the_weighted_mean_of_augmented_copies():
    from mclx.models.his2st import augment_section

    model = _tiny("his2st", distill_views=3).train()
    assert model.cfg.distill == 0.5 and model.coef is not None
    images, pos = torch.rand(6, 3, 112, 112), _grid(3, 2)
    feats = model.image_encoder(images)
    torch.manual_seed(1)
    got = model.distilled(feats, pos)
    torch.manual_seed(1)
    preds, weights = [], []
    for _ in range(3):
        view = augment_section(images)
        assert view.shape == images.shape and not torch.equal(view, images)
        h = model.hidden(view.flatten(1), pos)
        preds.append(model.gene_head(h))
        weights.append(model.coef(h))
    w = torch.softmax(torch.stack(weights), dim=0)  # per spot, over the copies
    torch.testing.assert_close(got, (torch.stack(preds) * w).sum(0))
    expr = torch.rand(6, 7)
    with torch.no_grad():
        plain = F.mse_loss(model(images, pos), expr)
        torch.manual_seed(2)
        target = model.distilled(feats, pos)
        torch.manual_seed(2)
        want = plain + 0.5 * F.mse_loss(target, model(images, pos))
        torch.manual_seed(2)
        torch.testing.assert_close(model.loss(feats, expr, pos), want)  # no counts: no ZINB
        model.eval()  # training only
        want = F.mse_loss(model(images, pos), expr)
        torch.testing.assert_close(model.loss(feats, expr, pos), want)
    assert _tiny("his2st", encoder="tiny_cnn").coef is None  # it reads pixels


def _tiny(name: str, **kw):
    torch.manual_seed(0)
    sizes = {
        "his2st": {"mixer_channels": 8, "mixer_depth": 1},
        "thitogene": {"capsules": 4, "capsule_dim": 8, "graph_heads": 2},
        "histogene": {},
    }[name]
    cfg = model_cfg(
        name, n_genes=7, embed_dim=32, depth=1, heads=2, dim_head=8, pos_size=(6, 5),
        dropout=0.0, **{**sizes, **kw},
    )  # fmt: skip
    return create_model(cfg, encoder_weights=None)


@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_graph_model_predicts_a_section_and_learns(name):
    model = _tiny(name).eval()
    images = torch.rand(12, 3, 128, 128)
    pos = _grid(6, 2)
    with torch.no_grad():
        out = model(images, pos)
        assert out.shape == (12, 7) and torch.isfinite(out).all()
        moved = pos.clone()
        moved[0] = torch.tensor([5, 4])
        assert not torch.allclose(model(images, moved)[0], out[0])  # positions matter
        # the torch backend runs models in channels_last: every weight must allow it
        last = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(last(images, pos), out, rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="positional tables"):
        model(images[:2], torch.tensor([[6, 0], [0, 0]]))
    with pytest.raises(ValueError, match="whole sections"):
        _tiny(name, context="batch")
    model.train()  # the published patch modules (pixels of the 112 px crop) learn
    feats, expr = model.image_encoder(images), torch.rand(12, 7)
    # His2ST's loss with its ZINB term on raw counts
    extra = (torch.randint(0, 6, (12, 7)).float(),) if name == "his2st" else ()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = float(model.loss(feats, expr, pos, *extra).detach())
    for _ in range(5):
        opt.zero_grad()
        model.loss(feats, expr, pos, *extra).backward()
        opt.step()
    assert float(model.loss(feats, expr, pos, *extra).detach()) < before


@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_graph_model_on_pooled_features_of_another_encoder(name):
    model = _tiny(name, encoder="tiny_cnn").eval()
    with torch.no_grad():
        out = model(torch.rand(5, 3, 64, 64), _grid(5, 1))
    assert out.shape == (5, 7)


@pytest.mark.parametrize("name", [*GRAPH_MODELS, "histogene"])
def test_section_model_standardises_pooled_features_with_the_training_statistics(name):
    """``feature_norm`` on a pooling encoder: the first layer reads (f - mean) / std of the
    training spots (float64 reference; a constant feature keeps std 1), the buffers
    travel in the state dict, and pixel-reading patch modules refuse it."""
    kw = {"encoder": "tiny_cnn"}
    normed, plain = _tiny(name, feature_norm=True, **kw), _tiny(name, **kw)
    plain.load_state_dict({k: v for k, v in normed.state_dict().items() if "feature_norm" not in k})
    rng = np.random.default_rng(0)
    train = rng.normal(5.0, 0.01, (40, normed.image_encoder.num_features))
    train[:, 0] = 3.0  # constant
    normed.set_feature_stats(train)
    mean, std = train.mean(0), train.std(0)
    std[std < 1e-12] = 1.0
    feats = rng.normal(5.0, 0.01, (10, train.shape[1]))
    pos = _grid(5, 2)
    normed.eval(), plain.eval()
    with torch.no_grad():
        got = normed.embed_image_features(torch.tensor(feats, dtype=torch.float32), pos)
        ref = plain.embed_image_features(torch.tensor((feats - mean) / std).float(), pos)
        raw = plain.embed_image_features(torch.tensor(feats, dtype=torch.float32), pos)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(got, raw, atol=1e-3)
    assert any(k.startswith("feature_norm.") for k in normed.state_dict())
    assert not any(k.startswith("feature_norm.") for k in plain.state_dict())
    if name != "histogene":  # the published patch modules read pixels
        with pytest.raises(ValueError, match="pooled features"):
            _tiny(name, feature_norm=True)


def test_published_defaults():
    h, t = model_cfg("his2st"), model_cfg("thitogene")
    assert (h.encoder, h.embed_dim, h.depth, h.heads, h.dropout) == ("patch112", 1024, 8, 16, 0.2)
    assert (h.graph_k, h.graph_radius, h.graph_depth, h.mixer_channels) == (4, 2.0, 4, 32)
    assert (h.mixer_kernel, h.mixer_patch, h.mixer_depth, h.context) == (5, 7, 2, "section")
    assert (t.depth, t.heads, t.graph_k, t.graph_radius, t.graph_heads) == (4, 16, 4, 0.0, 8)
    assert (t.capsules, t.capsule_dim, t.embed_dim, t.dropout) == (20, 64, 1024, 0.2)
    for name, epochs in [("his2st", 350), ("thitogene", 300)]:
        r = train_cfg(name)
        assert (r.epochs, r.lr, r.weight_decay, r.augment) == (epochs, 1e-5, 0.0, False)
    # His2ST's StepLR(50, 0.9), stepped per epoch
    step = train_cfg("his2st")
    assert [lr_at(step, e) for e in (0, 49, 50, 120)] == pytest.approx(
        [1e-5, 1e-5, 0.9e-5, 0.81e-5], rel=1e-12
    )
    assert lr_at(train_cfg("thitogene"), 299) == 1e-5
    # the ConvMixer's flattened output is the model width at the defaults (no projection)
    model = create_model(model_cfg("his2st", n_genes=3, depth=0), encoder_weights=None)
    assert model.mixer.num_features == 1024 and isinstance(model.patch_embedding, torch.nn.Identity)


@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_onnx_graph_builds_the_graph_for_any_section_size(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _tiny(name).eval()
    path = tmp_path / f"{name}.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model, (torch.rand(3, 3, 112, 112), _grid(3, 1)), str(path), dynamo=False,
            input_names=["images", "positions"], output_names=["out"], opset_version=17,
            dynamic_axes={"images": {0: "n"}, "positions": {0: "n"}, "out": {0: "n"}},
        )  # fmt: skip
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images, pos = torch.rand(20, 3, 112, 112), _grid(5, 4)  # more spots than k + 1 here
    with torch.no_grad():
        want = model(images, pos).numpy()
    got = sess.run(None, {"images": images.numpy(), "positions": pos.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("his2st", ["mixer_channels=8", "mixer_depth=1", "graph_depth=2"]),
        ("thitogene", ["capsules=4", "capsule_dim=8", "graph_heads=2"]),
    ],
)
def test_graph_model_through_the_command_line(name, sizes, synthetic, tmp_path, capsys):
    """Train (tiny sizes through --model-opt), export with parity, score without a
    bank; mclx infer predicts the section at its spots and refuses a tissue grid (no
    array coordinates) in one line."""
    from helpers import run_cli, tiny_options

    from mclx.checkpoint import load_checkpoint

    ck = tmp_path / f"{name}.pt"
    options = tiny_options(synthetic, model=name, encoder="patch112", epochs=1, batch_size=None)
    dims = ["--embed-dim", "16", "--depth", "1", "--heads", "2"]
    dims += [a for s in sizes for a in ("--model-opt", s)]
    steps = [
        ["train", "--data", synthetic, "--sections", "S1", *options, *dims, "-q", "--out", ck],
        ["export", "--ckpt", ck, "--calib-data", synthetic, "-q"],
        ["evaluate", "--data", synthetic, "--ckpt", ck, "--sections", "S3", "--out",
         tmp_path / "s3.json"],
    ]  # fmt: skip
    for args in steps:
        res = run_cli(capsys, args)
        assert res.returncode == 0, res.stderr
    cfg = load_checkpoint(ck).model_cfg
    given = dict(s.split("=") for s in sizes)
    assert {k: str(getattr(cfg, k)) for k in given} == given and cfg.embed_dim == 16
    report = json.loads((tmp_path / f"{name}.export.json").read_text())
    assert report["onnx"]["max_rel_err"] < 1e-4
    scored = json.loads((tmp_path / "s3.json").read_text())
    assert set(scored["sections"]["S3"]) >= {"pcc_acg", "pcc_heg", "mse"}
    slide = synthetic / "data" / "ST-imgs" / "S" / "S3" / "S3.jpg"
    spots = synthetic / "data" / "ST-spotfiles" / "S3_selection.tsv"
    out = tmp_path / "s3.h5ad"  # mclx infer runs a section model at given spots
    res = run_cli(capsys, ["infer", slide, "--model", ck, "--spots", spots, "--out", out, "-q"])
    assert res.returncode == 0 and out.is_file(), res.stderr
    res = run_cli(capsys, ["infer", slide, "--model", ck, "--mpp", "1", "--out",
                           tmp_path / "grid.h5ad", "-q"])  # fmt: skip
    assert res.returncode == 1 and "needs spot array coordinates: pass --spots" in res.stderr
    for opt, says in [("graph_k", "FIELD=VALUE"), ("n_genes=3", "FIELD=VALUE"),
                      ("graph_k=x", "'x' is not of type int")]:  # fmt: skip
        bad = run_cli(capsys, ["train", "--data", synthetic, "--model-opt", opt, "-q",
                               "--out", tmp_path / "x.pt"])  # fmt: skip
        assert bad.returncode == 1 and says in bad.stderr
        assert bad.stderr.startswith("mclx: error:") and bad.stderr.count("\n") == 1
