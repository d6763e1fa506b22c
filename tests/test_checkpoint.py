import pytest
import torch

from mclx.checkpoint import FORMAT_VERSION, fingerprint, load_checkpoint, save_checkpoint
from mclx.config import ModelCfg, PreprocessCfg
from mclx.errors import FormatError
from mclx.models import create_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = ModelCfg(encoder="tiny_cnn", n_genes=8, pos_size=(5, 6), embed_dim=16, context="section")
    return create_model(cfg).eval()


PRE = PreprocessCfg(genes=tuple(f"G{i}" for i in range(8)), mpp=0.7, log_base="e")


def test_round_trip_identical_outputs(model, tmp_path):
    path = tmp_path / "m.pt"
    fp = save_checkpoint(path, model, preprocess=PRE, provenance={"sections": ["A"], "seed": 3})
    raw = torch.load(path, weights_only=True)  # loadable without pickle code execution
    assert raw["format_version"] == FORMAT_VERSION and raw["fingerprint"] == fp
    ck = load_checkpoint(path)
    assert ck.model_cfg == model.cfg and ck.preprocess == PRE and ck.fingerprint == fp
    assert ck.provenance["seed"] == 3
    x = torch.rand(2, 3, 32, 32)
    expr, pos = torch.rand(4, 8), torch.randint(0, 5, (4, 2))
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(
            ck.model.embed_spots(expr, pos), model.embed_spots(expr, pos), rtol=0, atol=0
        )


def test_fingerprint_tracks_weights(model):
    a = fingerprint(model.state_dict())
    with torch.no_grad():
        model.spot_projection.fc.bias[0] += 1e-6
    assert fingerprint(model.state_dict()) != a


def test_newer_format_is_refused(model, tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, preprocess=PRE)
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = FORMAT_VERSION + 1
    torch.save(raw, path)
    with pytest.raises(FormatError, match="newer"):
        load_checkpoint(path)


def test_tampered_weights_and_garbage_are_refused(model, tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, preprocess=PRE)
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["spot_projection.fc.bias"][0] += 1
    torch.save(raw, path)
    with pytest.raises(FormatError, match="fingerprint"):
        load_checkpoint(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError, match="junk.pt"):
        load_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_failed_save_leaves_no_file(model, tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    path.write_bytes(b"good old file")

    def half_write(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, preprocess=PRE)
    assert path.read_bytes() == b"good old file"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
