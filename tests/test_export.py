"""ONNX / INT8 / bf16 exports against PyTorch, metadata, dynamic batch, backend choice."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, needs, run_cli

from mclx.checkpoint import load_checkpoint, save_checkpoint
from mclx.config import ModelCfg, PreprocessCfg, from_dict
from mclx.export.exporter import ParityError, export
from mclx.export.parity import compare
from mclx.inference import FORMATS, open_encoder
from mclx.inference.encoders import OnnxRuntimeEncoder, TorchEncoder, read_onnx_metadata
from mclx.inference.formats import auto_order, read_report
from mclx.models import create_model

ONNX, INT8, ENGINE = FORMATS["onnx"], FORMATS["onnx-int8"], FORMATS["engine"]
PRE = PreprocessCfg(genes=tuple(f"G{i}" for i in range(12)), mpp=0.7)


def _ckpt(path, encoder="tiny_cnn", seed=0):
    torch.manual_seed(seed)
    net = create_model(ModelCfg(encoder=encoder, n_genes=12, pos_size=(4, 4))).eval()
    save_checkpoint(path, net, preprocess=PRE)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synthetic):
    ck = _ckpt(tmp_path_factory.mktemp("exp") / "model.pt")
    report = export(ck, int8=True, calib_data=synthetic, n_patches=24, log=lambda *_: None)
    return ck, report


def test_fp32_parity_and_metadata(exported):
    ck, report = exported
    assert report["onnx"]["max_rel_err"] < 1e-4 and report["onnx-int8"]["min_cosine"] >= 0.99
    meta = read_onnx_metadata(ONNX.path(ck))
    loaded = load_checkpoint(ck)
    assert meta["fingerprint"] == loaded.fingerprint
    assert from_dict(PreprocessCfg, json.loads(meta["preprocess"])) == PRE
    assert json.loads(meta["model"])["encoder"] == "tiny_cnn"
    assert read_report(ck)["fingerprint"] == loaded.fingerprint


def test_dynamic_batch_gives_same_per_image_results(exported):
    ck, _ = exported
    ort_be = OnnxRuntimeEncoder(ONNX.path(ck))
    ref = TorchEncoder(load_checkpoint(ck))
    imgs = np.random.default_rng(0).integers(0, 256, (64, 224, 224, 3), dtype=np.uint8)
    full = ort_be(imgs)
    np.testing.assert_allclose(ort_be(imgs[:1]), full[:1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ort_be(imgs[:7]), full[:7], rtol=1e-5, atol=1e-5)
    assert compare(ref(imgs), full)["max_rel_err"] < 1e-4


def test_reduced_precision_paths(exported):
    ck, _ = exported
    imgs = np.random.default_rng(1).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    ref = TorchEncoder(load_checkpoint(ck))(imgs)
    int8 = open_encoder(ck, backend="onnxruntime", precision="int8", device="cpu")
    assert int8.precision == "int8"
    assert compare(ref, int8(imgs))["min_cosine"] >= 0.99
    bf16 = TorchEncoder(load_checkpoint(ck), precision="bf16")
    assert compare(ref, bf16(imgs))["min_cosine"] >= 0.99
    auto = open_encoder(ck, device="cpu")
    # auto: the fastest by the rates the export measured here, among the rows whose gate
    # held (OpenVINO's own INT8 file is not exported here: --openvino)
    report = read_report(ck)
    rates = {n: report[n]["rate"] for n in auto_order("cpu") if report.get(n, {}).get("held")}
    rates["torch"] = report["reference"]["rate"]
    assert auto.parity["format"] == max(rates, key=rates.get)
    assert set(rates) >= {"onnx", "onnx-int8"}


def test_parity_failure_keeps_the_good_file(exported, monkeypatch, tmp_path):
    ck, _ = exported
    dst = tmp_path / "model.pt"
    shutil.copy(ck, dst)
    shutil.copy(ONNX.path(ck), ONNX.path(dst))
    good = ONNX.path(dst).read_bytes()
    monkeypatch.setattr(
        "mclx.export.parity.compare", lambda a, b: {"max_rel_err": 0.5, "min_cosine": 0.5, "n": 1}
    )
    with pytest.raises(ParityError, match="FP32 parity failed"):
        export(dst, n_patches=4, log=lambda *_: None)
    assert ONNX.path(dst).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt"]


def test_encoder_from_another_checkpoint_is_refused(exported, tmp_path):
    ck, _ = exported
    other = _ckpt(tmp_path / "model.pt", seed=1)
    shutil.copy(ONNX.path(ck), ONNX.path(other))
    from mclx.errors import FingerprintMismatch

    with pytest.raises(FingerprintMismatch, match="re-export"):
        open_encoder(other, backend="onnxruntime", device="cpu")


def test_options_of_formats_not_asked_for_are_refused(tmp_path):
    """``max_batch`` belongs to the engine: without ``trt`` it would be silently
    ignored, so it is refused (before anything is written); unknown options too."""
    ck = _ckpt(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="--max-batch applies to the engine format only"):
        export(ck, max_batch=8, log=lambda *_: None)
    with pytest.raises(TypeError, match="unknown option --batch"):
        export(ck, batch=8, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


@pytest.mark.slow
def test_densenet121_exports_within_fp32_bound(tmp_path):
    ck = _ckpt(tmp_path / "dense.pt", encoder="densenet121")
    report = export(ck, n_patches=8, log=lambda *_: None)
    assert report["onnx"]["max_rel_err"] < 1e-4
    assert report["onnx"]["min_cosine"] > 0.99999


@pytest.mark.slow
def test_densenet121_fp16_graph_computes_in_fp16(tmp_path):
    """The graph TensorRT builds the FP16 engine from (issue 26): every Conv of a
    DenseNet-121 takes float16 data, weights and bias. ONNX Runtime's CPU optimiser put
    a Cast to float32 behind each float16 weight (182 of them), and TensorRT then built
    an FP32 engine from it. Types are read by the stand-in's own graph walk."""
    import onnx
    from helpers.fake_gpu import conv_input_types

    from mclx.export.onnx_export import compute_types, export_onnx, graph_precision

    ck = load_checkpoint(_ckpt(tmp_path / "dense.pt", encoder="densenet121"))
    path = export_onnx(ck, tmp_path / "dense.fp16.onnx", precision="fp16")
    model = onnx.load(str(path))
    convs = conv_input_types(model)
    assert len(convs) == 120 and {t for inputs in convs for t in inputs} == {"FLOAT16"}
    assert not [n.name for n in model.graph.node if n.name.startswith("InsertedPrecision")]
    assert compute_types(path) == {"float16": 120, "float": 2}  # + the float32 head
    assert graph_precision(path) == "fp16"
    ends = [*model.graph.input, *model.graph.output]
    assert {v.type.tensor_type.elem_type for v in ends} == {onnx.TensorProto.FLOAT}


def test_trt_on_cpu_fails_before_writing_anything(tmp_path):
    """--trt without the GPU stack is refused before any export: a failed run leaves no
    artifact (SPEC 8), not an ONNX file without the engine that was asked for."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU error path does not apply")
    ck = _ckpt(tmp_path / "m.pt")
    res = subprocess.run(
        [sys.executable, "-m", "mclx", "export", "--ckpt", str(ck), "--trt", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mclx: error: --trt:"), res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_failed_engine_build_leaves_the_folder_as_it_was(tmp_path, capsys, monkeypatch):
    """The engine is built from the FP32 ONNX file this run has already put in place:
    when the build fails, that file and the report this run wrote go too (SPEC: no
    partial output), and a file that was there before is put back as it was."""
    ck = _ckpt(tmp_path / "m.pt")
    old_report = tmp_path / "m.export.json"
    old_report.write_text('{"from": "an earlier export"}\n')
    monkeypatch.setattr("mclx.inference.device.require_gpu_stack", lambda *_, **__: None)

    def failed_build(job, out):
        out.write_bytes(b"half an engine")  # a builder's own leftovers go with its staging
        msg = f"{job.paths['engine']}: TensorRT engine build failed: out of memory"
        raise RuntimeError(msg)

    monkeypatch.setattr("mclx.export.tensorrt_build.build", failed_build)
    res = run_cli(capsys, ["export", "--ckpt", ck, "--trt", "-q"])
    assert_one_line_error(res, "m.engine: TensorRT engine build failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.export.json", "m.pt"]
    assert old_report.read_text() == '{"from": "an earlier export"}\n'


@needs("tensorrt")
def test_tensorrt_engine_parity(tmp_path):
    ck = _ckpt(tmp_path / "m.pt", encoder="densenet121")
    report = export(ck, trt=True, n_patches=16, max_batch=32, log=lambda *_: None)
    assert report["engine"]["min_cosine"] >= 0.99
    engine = ENGINE.path(ck)
    side = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert side["fingerprint"] == report["fingerprint"] and side["profile"]["max"] == 32
