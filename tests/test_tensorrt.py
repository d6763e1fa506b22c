"""TensorRT engines built and run through stand-ins with the TensorRT 10 and 11 API
shapes (``helpers.fake_gpu``): a fake engine runs its ONNX graph in ONNX Runtime, so
parity, the report and the sidecar are the real exporter's on real embeddings. What only
a GPU can show (real kernels, real streams) is in ``make gpu-check`` and the ``gpu``
marked tests."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import fake_gpu, needs

from mclx.checkpoint import load_checkpoint, save_checkpoint
from mclx.config import ModelCfg, PreprocessCfg
from mclx.export.exporter import export
from mclx.export.tensorrt_build import profile_batches
from mclx.inference import FORMATS
from mclx.inference.encoders import TorchEncoder
from mclx.models import create_model

ENGINE = FORMATS["engine"]
PRE = PreprocessCfg(genes=tuple(f"G{i}" for i in range(6)), patch_size=32)


def _ckpt(path, seed=0):
    torch.manual_seed(seed)
    net = create_model(ModelCfg(encoder="tiny_cnn", n_genes=6, pos_size=(4, 4))).eval()
    save_checkpoint(path, net, preprocess=PRE)
    return path


def _export(tmp_path, monkeypatch, major=11, **options):
    trt, cp = fake_gpu.install(monkeypatch, major)
    ck = _ckpt(tmp_path / "m.pt")
    report = export(ck, trt=True, n_patches=8, log=lambda *_: None, **options)
    return ck, report, trt, cp


@pytest.mark.parametrize("major", [10, 11])
def test_fp16_engine_builds_strongly_typed_on_tensorrt_10_and_11(tmp_path, monkeypatch, major):
    """TensorRT 11 has neither BuilderFlag.FP16 nor platform_has_fast_fp16: FP16 comes
    from an FP16 graph (float32 I/O) in a strongly typed network, on 10 as on 11; the
    profile's opt batch is clamped to --max-batch."""
    ck, report, trt, _ = _export(tmp_path, monkeypatch, major, max_batch=32)
    (built,) = trt.built
    assert built["strongly_typed"] and built["graph_fp16"]
    assert built["conv_types"] == ["FLOAT16"] and built["precision"] == "fp16"
    assert "FP16" not in built["flags"] and "TF32" not in built["flags"]
    assert built["profile"] == [[1, 3, 32, 32], [32, 3, 32, 32], [32, 3, 32, 32]]
    entry = report["engine"]
    assert entry["precision"] == "fp16" and entry["min_cosine"] >= 0.99
    engine = ENGINE.path(ck)
    side = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert side["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert side["precision"] == "fp16" and side["profile"] == {"min": 1, "opt": 32, "max": 32}
    assert side["tensorrt_version"] == trt.__version__ and side["gpu"] == "Fake GPU"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.engine", "m.engine.json", "m.engine.timing.cache", "m.export.json", "m.onnx", "m.pt",
    ]  # fmt: skip


def test_fp32_engine_has_tf32_cleared_and_says_fp32(tmp_path, monkeypatch):
    """TF32 is on by default in TensorRT; an FP32 engine clears it and is checked (and
    labelled) as FP32: within 1e-4 of PyTorch."""
    ck, report, trt, _ = _export(tmp_path, monkeypatch, fp16=False, max_batch=8)
    (built,) = trt.built
    assert not built["graph_fp16"] and "TF32" not in built["flags"]
    assert built["precision"] == "fp32" and built["conv_types"] == ["FLOAT"]
    assert report["engine"]["precision"] == "fp32" and report["engine"]["max_rel_err"] < 1e-4
    assert built["profile"][1][0] == 8


def test_profile_batches():
    assert profile_batches(1, 64, 32) == (1, 32, 32)
    assert profile_batches(1, 64, 256) == (1, 64, 256)
    assert profile_batches(4, 2, 8) == (4, 4, 8)
    with pytest.raises(ValueError, match="min batch"):
        profile_batches(9, 64, 8)


def _cast_back_to_float32(graph, out):
    """What the old exporter wrote for TensorRT: the FP16 graph after ONNX Runtime's CPU
    optimiser, which puts a Cast to float32 after every float16 weight."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    return out


def test_graph_that_casts_its_fp16_weights_to_fp32_is_an_fp32_engine(tmp_path, monkeypatch):
    """float16 weights do not make an FP16 engine: a strongly typed network computes in
    its Conv inputs' types. The stand-in builds such a graph as FP32; the sidecar says
    FP32 too, and ``mclx export --trt`` refuses to call it FP16."""
    from mclx.export import onnx_export, tensorrt_build

    trt, _ = fake_gpu.install(monkeypatch, 11)
    ck = load_checkpoint(_ckpt(tmp_path / "m.pt"))
    fp16 = onnx_export.export_onnx(ck, tmp_path / "fp16.onnx", precision="fp16")
    cast = _cast_back_to_float32(fp16, tmp_path / "cast.onnx")
    assert onnx_export.compute_types(fp16) == {"float16": 4, "float": 2}
    assert onnx_export.compute_types(cast) == {"float": 6}
    engine = tensorrt_build.build_engine(cast, tmp_path / "cast.engine", max_batch=4)
    assert trt.built[-1]["precision"] == "fp32" and trt.built[-1]["conv_types"] == ["FLOAT"]
    assert json.loads((tmp_path / "cast.engine.json").read_text())["precision"] == "fp32"
    engine.unlink()
    export_onnx = onnx_export.export_onnx

    def old_exporter(ck, out, **kw):
        return _cast_back_to_float32(export_onnx(ck, out, **kw), out)

    monkeypatch.setattr(onnx_export, "export_onnx", old_exporter)
    with pytest.raises(RuntimeError, match=r"the FP16 graph computes in float32 \(Conv"):
        export(tmp_path / "m.pt", trt=True, n_patches=4, log=lambda *_: None)
    assert not list(tmp_path.glob("m.engine*")) and len(trt.built) == 1


@pytest.mark.parametrize(
    "call", ["add_optimization_profile", "set_timing_cache", "get_timing_cache"]
)
def test_failed_build_step_leaves_no_engine_and_no_sidecar(tmp_path, monkeypatch, call):
    """TensorRT says failure with -1 (a profile), False (a timing cache) or None (the
    cache after the build): one line, and neither the engine nor its sidecar nor the
    cache is written (an engine without its sidecar cannot run)."""
    from mclx.export import tensorrt_build
    from mclx.export.onnx_export import export_onnx

    trt, _ = fake_gpu.install(monkeypatch, 11)
    graph = export_onnx(load_checkpoint(_ckpt(tmp_path / "m.pt")), tmp_path / "m.onnx")
    trt.fail.add(call)
    with pytest.raises(RuntimeError, match=f"m.engine: TensorRT .*{call.split('_')[1]}") as err:
        tensorrt_build.build_engine(graph, tmp_path / "m.engine", max_batch=4)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt"]


def test_without_tensorrt_the_build_says_so_in_one_line(tmp_path, monkeypatch):
    """The GPU-stack check comes before ``import tensorrt`` (an ImportError otherwise)."""
    import sys

    from mclx.export import tensorrt_build

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    with pytest.raises(RuntimeError, match=r"m.engine: TensorRT is not installed"):
        tensorrt_build.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")


@pytest.fixture
def engine(tmp_path, monkeypatch):
    """An FP16 engine with a profile of at most 4 images, and the fakes it runs on."""
    ck, _, trt, cp = _export(tmp_path, monkeypatch, max_batch=4)
    return ck, ENGINE.path(ck), trt, cp


def _patches(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_every_copy_and_launch_is_on_the_engine_stream(engine):
    """Copies on the null stream while the engine runs on a non-blocking stream let
    TensorRT read a half-copied batch. A batch already on the GPU is waited for first."""
    from mclx.inference.tensorrt import TensorRTEncoder

    _, path, _, cp = engine
    enc = TensorRTEncoder(path)
    cp.log.clear()
    enc(_patches(7))
    ops = [e for e in cp.log if e[0] not in ("record", "wait", "synchronize")]
    assert {e[0] for e in ops} >= {"asarray", "empty", "execute"}
    assert all(e[1] == enc.stream.ptr for e in ops), ops
    assert cp.log[-1] == ("synchronize", enc.stream.ptr)
    on_gpu = cp.asarray(np.zeros((3, 3, 32, 32), np.float32))  # made on the null stream
    cp.log.clear()
    enc(on_gpu)
    first_launch = cp.log.index(("execute", enc.stream.ptr))
    assert ("wait", enc.stream.ptr, 0) in cp.log[:first_launch]


@pytest.mark.parametrize("n", [1, 3, 4, 5, 17])  # 1, 7-like, max, max + 1, 3 max + 5
def test_batches_are_split_at_the_engine_profile(engine, n):
    from mclx.inference.tensorrt import TensorRTEncoder

    ck, path, _, _ = engine
    enc = TensorRTEncoder(path)
    assert (enc.min_batch, enc.max_batch) == (1, 4)
    x = _patches(n, seed=n)
    got = enc(x).get()
    ref = TorchEncoder(load_checkpoint(ck))(x)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert got.shape == ref.shape and got.dtype == np.float32 and cos.min() > 0.999


def test_no_execution_context_is_an_error(engine):
    """``create_execution_context`` returns None when TensorRT cannot make one (device
    memory for the activations): one line at open, not an AttributeError at run."""
    from mclx.inference.tensorrt import TensorRTEncoder

    _, path, trt, _ = engine
    trt.fail.add("create_execution_context")
    with pytest.raises(RuntimeError, match=f"{path}: TensorRT cannot create an execution"):
        TensorRTEncoder(path)


@pytest.mark.parametrize("call", ["set_input_shape", "set_tensor_address", "execute_async_v3"])
def test_false_from_tensorrt_is_an_error(engine, call):
    """TensorRT says failure with False: reading the output then returns whatever the
    buffer held."""
    from mclx.inference.tensorrt import TensorRTEncoder

    _, path, trt, _ = engine
    trt.fail.add(call)
    enc = TensorRTEncoder(path)
    with pytest.raises(RuntimeError, match=f"{path}: TensorRT .* failed") as err:
        enc(_patches(2))
    assert "\n" not in str(err.value)


def test_profile_and_types_come_from_the_engine(engine, monkeypatch):
    """The sidecar's profile is not needed (nor trusted); a float16 output is returned
    as float32."""
    from mclx.inference.tensorrt import TensorRTEncoder, sidecar_path

    _, path, _, _ = engine
    side = json.loads(sidecar_path(path).read_text())
    side["profile"] = {"max": 1000}
    sidecar_path(path).write_text(json.dumps(side))
    monkeypatch.setattr(fake_gpu._Engine, "out_dtype", fake_gpu.DataType.HALF)
    enc = TensorRTEncoder(path)
    assert enc.max_batch == 4 and enc.out_dtype == np.float16
    assert enc(_patches(5)).dtype == np.float32


def test_sidecar_of_another_build_is_refused(engine, tmp_path):
    """Engine and sidecar are renamed one after the other: after an interrupted export
    the pair may not match. The sidecar's hash of the engine bytes tells."""
    from mclx.errors import FormatError
    from mclx.inference.tensorrt import TensorRTEncoder, sidecar_path

    _, path, _, _ = engine
    other = tmp_path / "other.engine"
    other.write_bytes(path.read_bytes().replace(b'"major"', b'"major" ', 1))
    shutil.copy(sidecar_path(path), sidecar_path(other))
    with pytest.raises(FormatError, match="describes another engine than other.engine"):
        TensorRTEncoder(other)


def test_engine_on_a_chosen_gpu(engine):
    from mclx.inference.tensorrt import TensorRTEncoder

    _, path, _, _ = engine
    enc = TensorRTEncoder(path, device="cuda:1")
    assert enc.device == "cuda:1" and enc.gpu.id == 1
    assert enc(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 256)


# --- on a GPU: the same paths with the real TensorRT ----------------------------------


@needs("tensorrt")
@pytest.mark.parametrize("fp16", [True, False])
def test_real_engine_at_its_profile_edges_with_the_null_stream_busy(tmp_path, fp16):
    """What the stand-in tests check, on a real GPU: FP16 cosine >= 0.99 or FP32 within
    1e-4 of PyTorch at batches 1, 7, max, max + 1 and 3 max + 5, from host and device
    memory, while the null stream is busy."""
    import cupy as cp

    from mclx.export.parity import compare
    from mclx.inference.tensorrt import TensorRTEncoder
    from mclx.inference.transform import to_model_input

    ck = _ckpt(tmp_path / "m.pt")
    report = export(ck, trt=True, fp16=fp16, max_batch=8, n_patches=8, log=lambda *_: None)
    assert report["engine"]["precision"] == ("fp16" if fp16 else "fp32")
    enc = TensorRTEncoder(ENGINE.path(ck))
    assert (enc.min_batch, enc.max_batch) == (1, 8)
    x = _patches(29, seed=3)
    ref = TorchEncoder(load_checkpoint(ck))(x)
    for n in (1, 7, 8, 9, 29):
        for batch in (x[:n], cp.asarray(to_model_input(x[:n], PRE))):
            with cp.cuda.Stream.null:
                busy = cp.ones((2048, 2048), cp.float32)
                for _ in range(4):
                    busy = (busy @ busy) * np.float32(1e-3)
            res = compare(ref[:n], enc(batch).get())
            assert res["min_cosine"] >= 0.99, (n, res)
            assert fp16 or res["max_rel_err"] <= 1e-4, (n, res)
