"""``--encoder timm:NAME --encoder-weights FILE``: a small timm model whose weights the
test saves itself (no download), against timm's own forward; its input size and
normalisation through the checkpoint, the ONNX export and prediction."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from helpers import needs
from helpers.cli import assert_one_line_error, run_cli

NAME = "test_vit"  # timm's own test ViT: 160 px, mean = std = 0.5, class-token pooling


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A saved timm state dict, classifier included, as a real weights file has."""
    import timm

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("timm") / f"{NAME}.pth"
    torch.save(timm.create_model(NAME).state_dict(), path)
    return path


@needs("timm")
def test_timm_encoder_loads_the_file_and_pools_as_timm_does(weights):
    import timm

    from mclx.models import create_encoder

    ref = timm.create_model(NAME, num_classes=0)
    ref.load_state_dict(torch.load(weights, weights_only=True), strict=False)
    enc = create_encoder(f"timm:{NAME}", weights=weights).eval()
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        expected = ref.eval()(x)
        torch.testing.assert_close(enc(x), expected)
        tokens = enc.forward_tokens(x)
    assert enc.num_features == expected.shape[1] == tokens.shape[2]
    # pooled as the model card says (class token), not the mean of the tokens
    assert not torch.allclose(tokens.mean(1), expected, atol=1e-4)
    random = create_encoder(f"timm:{NAME}", weights=None)
    assert not torch.allclose(random.eval()(x), expected)


@needs("timm")
def test_timm_ridge_through_checkpoint_export_and_prediction(weights, synthetic, tmp_path, capsys):
    """``mclx train`` records timm's input size and mean/std; the ONNX graph takes
    160 px images and matches PyTorch; prediction cuts 160 px patches."""
    from mclx.checkpoint import load_checkpoint
    from mclx.data.her2st import read_her2st
    from mclx.data.patches import section_patches
    from mclx.inference import FORMATS, open_encoder, predict
    from mclx.inference.encoders import read_onnx_metadata

    ck = tmp_path / "timm_ridge.pt"
    args = ["train", "--data", synthetic, "--genes", synthetic / "genes.txt", "-q"]
    args += ["--model", "ridge", "--encoder", f"timm:{NAME}", "--encoder-weights", weights]
    res = run_cli(capsys, [*args, "--sections", "S1,S2", "--out", ck])
    assert res.returncode == 0, res.stderr
    loaded = load_checkpoint(ck)
    pre = loaded.preprocess
    assert (pre.patch_size, pre.mean, pre.std) == (160, (0.5,) * 3, (0.5,) * 3)
    assert loaded.model_cfg.encoder == f"timm:{NAME}"
    res = run_cli(capsys, ["export", "--ckpt", ck])
    assert res.returncode == 0, res.stderr
    onnx = FORMATS["onnx"].path(ck)
    meta = json.loads(read_onnx_metadata(onnx)["preprocess"])
    assert meta["patch_size"] == 160 and meta["mean"] == [0.5] * 3
    adata = read_her2st(synthetic, ["S3"], with_image=True)["S3"]
    patches = section_patches(adata, pre.patch_size, pre.mpp)
    assert patches.shape[1:] == (160, 160, 3)
    torch_pred = predict(open_encoder(ck, backend="torch"), patches)
    onnx_pred = predict(open_encoder(ck, backend="onnxruntime"), patches)
    np.testing.assert_allclose(onnx_pred, torch_pred, rtol=1e-4, atol=1e-4)
    # the pixels are normalised with timm's mean/std: a hand-made input gives the same
    x = (torch.as_tensor(patches[:4]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        by_hand = loaded.model.eval()(x).numpy()
    np.testing.assert_allclose(torch_pred[:4], by_hand, rtol=1e-4, atol=1e-5)


@needs("timm")
def test_timm_weights_must_be_a_local_file(synthetic, tmp_path, capsys):
    args = ["train", "--data", synthetic, "--genes", synthetic / "genes.txt", "-q"]
    args += ["--model", "ridge", "--encoder", f"timm:{NAME}", "--encoder-weights", "imagenet"]
    res = run_cli(capsys, [*args, "--out", tmp_path / "m.pt"])
    assert_one_line_error(res, "imagenet", "local file")


def test_missing_timm_is_one_line(synthetic, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    args = ["train", "--data", synthetic, "--genes", synthetic / "genes.txt", "-q"]
    res = run_cli(capsys, [*args, "--encoder", f"timm:{NAME}", "--out", tmp_path / "m.pt"])
    assert_one_line_error(res, "mclx[timm]")
    assert not (tmp_path / "m.pt").exists()
