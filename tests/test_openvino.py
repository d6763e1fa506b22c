"""The OpenVINO backend: it runs the FP32 ONNX file (fp32, bf16 hint) and NNCF's INT8
file (``mclx export --openvino``); its parity is recorded at export, ``auto`` takes it
only with a record that held."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import needs

from mclx.checkpoint import load_checkpoint, save_checkpoint
from mclx.config import ModelCfg, PreprocessCfg
from mclx.export.exporter import export
from mclx.export.parity import compare
from mclx.inference import FORMATS, open_encoder
from mclx.inference.encoders import OnnxRuntimeEncoder, TorchEncoder
from mclx.inference.formats import MIN_COSINE, read_report, report_path
from mclx.kernels import cpu_has_fast_bf16
from mclx.models import create_model

PRE = PreprocessCfg(genes=tuple(f"G{i}" for i in range(12)), mpp=0.7)
ONNX, INT8 = FORMATS["onnx"], FORMATS["openvino-int8"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synthetic):
    torch.manual_seed(0)
    net = create_model(ModelCfg(encoder="tiny_cnn", n_genes=12, pos_size=(4, 4))).eval()
    ck = tmp_path_factory.mktemp("ov") / "model.pt"
    save_checkpoint(ck, net, preprocess=PRE)
    openvino = importlib.util.find_spec("openvino") is not None
    export(ck, openvino=openvino, calib_data=synthetic, n_patches=24, log=lambda *_: None)
    return ck


@pytest.fixture(scope="module")
def imgs():
    return np.random.default_rng(2).integers(0, 256, (9, 224, 224, 3), dtype=np.uint8)


@needs("openvino")
def test_export_records_openvino_parity_on_the_onnx_files(exported):
    report = read_report(exported)
    assert report["openvino"]["path"] == str(ONNX.path(exported))
    assert report["openvino"]["max_rel_err"] < 1e-4  # fp32 as ONNX Runtime
    assert report["openvino-int8"]["path"] == str(INT8.path(exported))
    assert report["openvino-int8"]["min_cosine"] >= MIN_COSINE
    # NNCF left the head after the pooled features in FP32 (#27), and says so
    assert "/image_projection/projection/Gemm" in report["openvino-int8"]["fp32_layers"]
    if cpu_has_fast_bf16():
        assert report["openvino-bf16"]["min_cosine"] >= MIN_COSINE
    # no file of its own: nothing but the ONNX files, the checkpoint and the report
    assert sorted(p.name for p in exported.parent.iterdir()) == sorted(
        ["model.pt", "model.onnx", "model.ov-int8.onnx", report_path(exported).name]
    )


@needs("openvino")
def test_openvino_fp32_matches_onnx_runtime_at_any_batch(exported, imgs):
    ov = open_encoder(exported, backend="openvino", precision="fp32")
    assert (ov.name, ov.precision, ov.fingerprint) == (
        "openvino", "fp32", load_checkpoint(exported).fingerprint,
    )  # fmt: skip
    want = OnnxRuntimeEncoder(ONNX.path(exported))(imgs)
    full = ov(imgs)
    assert compare(want, full)["max_rel_err"] < 1e-4
    np.testing.assert_allclose(ov(imgs[:1]), full[:1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ov(imgs[2:7]), full[2:7], rtol=1e-4, atol=1e-5)


@needs("openvino")
def test_openvino_reduced_precisions_keep_the_embeddings(exported, imgs):
    ref = TorchEncoder(load_checkpoint(exported))(imgs)
    int8 = open_encoder(exported, backend="openvino", precision="int8")
    assert int8.path == INT8.path(exported)
    assert compare(ref, int8(imgs))["min_cosine"] >= MIN_COSINE
    direct = open_encoder(INT8.path(exported))  # the file, given as is
    assert (direct.name, direct.precision) == ("openvino", "int8")
    with pytest.raises(ValueError, match="OpenVINO runs the exported"):
        open_encoder(FORMATS["onnx-int8"].path(exported), backend="openvino")
    if not cpu_has_fast_bf16():
        with pytest.raises(RuntimeError, match="no bf16 arithmetic"):
            open_encoder(exported, backend="openvino", precision="bf16")
        return
    bf16 = open_encoder(exported, backend="openvino", precision="bf16")
    assert compare(ref, bf16(imgs))["min_cosine"] >= MIN_COSINE


@needs("openvino")
def test_auto_takes_openvino_only_with_a_record_that_held(exported, tmp_path):
    import shutil

    ck = tmp_path / "model.pt"
    for src in (exported, ONNX.path(exported), INT8.path(exported), report_path(exported)):
        shutil.copy(src, tmp_path / src.name)
    first = "openvino-bf16" if cpu_has_fast_bf16() else "openvino-int8"
    report = json.loads(report_path(ck).read_text())
    report["host"] = "measured elsewhere"  # auto: the table's order, not the rates
    report_path(ck).write_text(json.dumps(report))
    auto = open_encoder(ck, device="cpu")
    assert (auto.name, auto.precision) == ("openvino", FORMATS[first].precision)
    report = json.loads(report_path(ck).read_text())
    report[first]["min_cosine"] = MIN_COSINE - 0.01  # drifted: never chosen
    report_path(ck).write_text(json.dumps(report))
    auto = open_encoder(ck, device="cpu")
    assert (auto.name, auto.precision) != ("openvino", FORMATS[first].precision)
    for name in ("openvino-int8", "openvino-bf16"):  # reduced precision unrecorded (bf16
        report.pop(name, None)  # is not recorded at all on a CPU without bf16 arithmetic)
    report_path(ck).write_text(json.dumps(report))
    auto = open_encoder(ck, device="cpu")
    assert auto.name != "openvino" or auto.precision == "fp32"


@needs("openvino")
def test_quiet_export_prints_no_nncf_progress(tmp_path):
    """``mclx export --openvino --int8 -q`` prints its final line only: NNCF's progress
    bars ("Statistics collection", "Applying Fast Bias correction", drawn on stdout)
    are not shown under -q."""
    from helpers import mclx

    torch.manual_seed(0)
    net = create_model(ModelCfg(encoder="tiny_cnn", n_genes=12, pos_size=(4, 4))).eval()
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, net, preprocess=PRE)
    res = mclx("export", "--ckpt", ck, "--openvino", "--int8", "-q")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mclx: exported {ck} ("), res.stdout
    assert res.stderr == ""
    assert INT8.path(ck).is_file()


def test_openvino_refusals_are_one_line(tmp_path, monkeypatch):
    from mclx.inference.openvino import OpenVinoEncoder

    with pytest.raises(ValueError, match="CPU only"):
        OpenVinoEncoder(tmp_path / "m.onnx", device="cuda")
    with pytest.raises(ValueError, match="precision 'fp16' not offered"):
        OpenVinoEncoder(tmp_path / "m.onnx", precision="fp16")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    missing = r"m\.onnx: OpenVINO is not installed .*pip install -e '\.\[openvino\]'"
    with pytest.raises(RuntimeError, match=missing):
        OpenVinoEncoder(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="unknown backend 'openvin'.*openvino"):
        open_encoder(tmp_path / "m.pt", backend="openvin")


@needs("openvino")
def test_openvino_int8_is_gated_in_openvino(exported, tmp_path, synthetic, monkeypatch):
    import shutil

    from mclx.inference import openvino as ov_module

    ck = tmp_path / "model.pt"
    shutil.copy(exported, ck)
    opened = []
    original = ov_module.OpenVinoEncoder.__init__

    def spy(self, path, **kw):
        opened.append((Path(path).name, kw.get("precision")))
        original(self, path, **kw)

    monkeypatch.setattr(ov_module.OpenVinoEncoder, "__init__", spy)
    export(ck, openvino=True, calib_data=synthetic, n_patches=24, log=lambda *_: None)
    # the staging file of model.ov-int8.onnx, before it is renamed into place
    assert (".model.ov-int8.onnx.staging.onnx", "int8") in opened
