import numpy as np
import pytest
import torch

from mclx.config import ModelCfg
from mclx.errors import DataError
from mclx.models import (
    ENCODERS,
    MODELS,
    ProjectionHead,
    SpotEncoder,
    bleep_loss,
    clip_loss,
    create_encoder,
    create_model,
    model_cfg,
)


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoders_from_registry(name):
    """Every encoder pools to ``num_features`` and gives tokens (N, T, F) whose mean is
    the pooled feature (CMRCNet trains on any encoder's tokens)."""
    torch.manual_seed(0)
    enc = create_encoder(name, weights=None).eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        feats, tokens = enc(x), enc.forward_tokens(x)
    assert feats.shape == (2, enc.num_features)
    assert tokens.ndim == 3 and tokens.shape[::2] == (2, enc.num_features)
    torch.testing.assert_close(tokens.mean(1), feats, rtol=1e-5, atol=1e-6)


def test_unknown_encoder_suggests_close_names():
    with pytest.raises(KeyError, match="densenet121"):
        create_encoder("densenet12", weights=None)


def test_densenet_weights_file_round_trip(tmp_path):
    from torchvision.models import densenet121

    torch.manual_seed(0)
    ref = densenet121(weights=None)
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    enc = create_encoder("densenet121", weights=path)
    x = torch.rand(1, 3, 64, 64)
    ref.eval(), enc.eval()
    expected = torch.relu(ref.features(x)).mean((2, 3))
    torch.testing.assert_close(enc(x), expected)


def test_projection_head_formula():
    torch.manual_seed(0)
    head = ProjectionHead(10, 6, dropout=0.0).eval()
    x = torch.randn(4, 10)
    p = x @ head.projection.weight.T + head.projection.bias
    y = torch.nn.functional.gelu(p) @ head.fc.weight.T + head.fc.bias
    expected = torch.nn.functional.layer_norm(
        y + p, (6,), head.layer_norm.weight, head.layer_norm.bias
    )
    torch.testing.assert_close(head(x), expected)
    assert head(x).shape == (4, 6)


def _np_log_softmax(a):
    a = a - a.max(1, keepdims=True)
    return a - np.log(np.exp(a).sum(1, keepdims=True))


def test_clip_loss_against_formula():
    spot = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    img = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.4]])
    logits = spot.double().numpy() @ img.double().numpy().T / 0.5
    expected = (
        -(np.diag(_np_log_softmax(logits)).mean() + np.diag(_np_log_softmax(logits.T)).mean()) / 2
    )
    assert float(clip_loss(spot, img, 0.5)) == pytest.approx(expected, rel=1e-6)


def test_bleep_loss_against_formula():
    rng = np.random.default_rng(0)
    spot, img = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    logits = spot @ img.T
    sim = (img @ img.T + spot @ spot.T) / 2
    targets = np.exp(sim - sim.max(1, keepdims=True))
    targets /= targets.sum(1, keepdims=True)
    spots_loss = -(targets * _np_log_softmax(logits)).sum(1)
    images_loss = -(targets.T * _np_log_softmax(logits.T)).sum(1)
    expected = ((spots_loss + images_loss) / 2).mean()
    got = bleep_loss(torch.tensor(spot), torch.tensor(img), 1.0)
    assert float(got) == pytest.approx(expected, rel=1e-9)


def _cfg(**kw):
    return ModelCfg(encoder="tiny_cnn", n_genes=16, pos_size=(8, 9), embed_dim=32, **kw)


def test_spot_encoder_shapes_and_positions():
    torch.manual_seed(0)
    enc = SpotEncoder(_cfg()).eval()
    expr = torch.rand(5, 16)
    pos = torch.tensor([[0, 0], [1, 2], [7, 8], [3, 3], [2, 1]])
    out = enc(expr, pos)
    assert out.shape == (5, 16)
    moved = pos.clone()
    moved[0] = torch.tensor([4, 4])
    assert not torch.allclose(enc(expr, moved)[0], out[0])  # positions matter
    with pytest.raises(DataError, match="positional tables"):
        enc(expr, torch.tensor([[8, 0]] * 5))


def test_ablations_change_the_architecture():
    full = SpotEncoder(_cfg())
    nopos = SpotEncoder(_cfg(pos_embed=False))
    notf = SpotEncoder(_cfg(depth=0))
    assert full.x_embed is not None and nopos.x_embed is None
    assert len(full.blocks) == 2 and len(notf.blocks) == 0
    expr = torch.rand(3, 16)
    pos = torch.zeros(3, 2, dtype=torch.long)
    torch.testing.assert_close(
        notf(expr, pos), expr + notf.x_embed(pos[:, 0]) + notf.y_embed(pos[:, 1])
    )


# knn and ridge fit in closed form (fit_features), with no loss to step on
GRADIENT_MODELS = [n for n in MODELS.names() if MODELS.meta(n).get("train", {}).get("epochs") != 0]


@pytest.mark.parametrize("name", GRADIENT_MODELS)
def test_gradient_step_lowers_loss(name):
    torch.manual_seed(0)
    model = create_model(
        model_cfg(name, encoder="tiny_cnn", n_genes=16, pos_size=(8, 8), embed_dim=32, dropout=0.0)
    )
    feats = torch.randn(12, model.image_encoder.num_features)
    expr = torch.rand(12, 16)
    pos = torch.randint(0, 8, (12, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = float(model.loss(feats, expr, pos).detach())
    for _ in range(5):
        opt.zero_grad()
        model.loss(feats, expr, pos).backward()
        opt.step()
    assert float(model.loss(feats, expr, pos).detach()) < before


def test_model_defaults_follow_the_papers():
    assert model_cfg("mclstexp").k == 200
    b = model_cfg("bleep")
    assert (b.k, b.weighting, b.pos_embed, b.depth) == (50, "mean", False, 0)
    s = model_cfg("stnet", k=3)  # overrides win over the publication's defaults
    assert (s.k, s.pos_embed, s.depth) == (3, False, 0)
    with pytest.raises(KeyError, match="mclstexp"):
        model_cfg("mclstex")
    with pytest.raises(KeyError, match="mclstexp"):
        create_model(ModelCfg(name="mclstex", encoder="tiny_cnn"))


def test_imagenet_weights_missing_names_the_file_and_where_it_goes(tmp_path, monkeypatch):
    """`--encoder-weights imagenet` without the cached file: which file, and where."""
    import torch
    from torchvision.models import DenseNet121_Weights

    from mclx.models import create_encoder

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    name = DenseNet121_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    with pytest.raises(FileNotFoundError) as info:
        create_encoder("densenet121", weights="imagenet")
    msg = str(info.value)
    assert name in msg and str(tmp_path / "checkpoints" / name) in msg
    assert "--encoder-weights FILE" in msg
