"""The inference layer: one pixel transform, one device resolver, the formats table, and
`predict` against an independent float64 computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mclx.config import PreprocessCfg
from mclx.inference.transform import to_model_input, to_tensor

PRE = PreprocessCfg(genes=("a", "b"))
NORMALISED = PreprocessCfg(genes=("a", "b"), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))


@pytest.mark.parametrize("pre", [PRE, NORMALISED], ids=["unit", "mean-std"])
def test_pixel_transform_is_one_formula_for_numpy_and_torch(pre):
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, size=(3, 8, 9, 3), dtype=np.uint8)
    mean = np.asarray(pre.mean)[None, :, None, None]
    std = np.asarray(pre.std)[None, :, None, None]
    expected = (patches.transpose(0, 3, 1, 2).astype(np.float64) / 255 - mean) / std
    got_np = to_model_input(patches, pre)
    got_torch = to_model_input(torch.from_numpy(patches), pre)
    assert got_np.dtype == np.float32 and got_np.shape == (3, 3, 8, 9)
    assert got_np.flags.c_contiguous
    np.testing.assert_allclose(got_np, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_torch.numpy(), got_np)  # bit-identical paths
    t = to_tensor(patches, pre, "cpu")
    assert t.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(t.numpy(), got_np)


def test_float_input_passes_through_unscaled():
    x = np.random.default_rng(1).random((2, 3, 4, 4)).astype(np.float64)
    out = to_model_input(x, NORMALISED)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x, rtol=1e-7)


def test_device_resolution_on_this_machine():
    from mclx.inference.device import resolve_device, torch_cuda, torch_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch_cuda() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch_cuda():
        with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
            torch_device("cuda")


def test_formats_table_names_files_and_refuses_foreign_options():
    from mclx.export.exporter import check_options, requested
    from mclx.inference.choose import _format
    from mclx.inference.formats import FORMATS, format_of_file

    assert FORMATS["onnx-int8"].path("run/m.pt").name == "m.int8.onnx"
    assert format_of_file("m.int8.onnx").name == "onnx-int8"  # longest suffix wins
    assert format_of_file("m.onnx").name == "onnx"
    assert format_of_file("m.engine").name == "engine"
    assert format_of_file("m.pt") is None
    assert [f.name for f in requested(set())] == ["onnx"]
    assert [f.name for f in requested({"int8", "trt"})] == ["onnx", "onnx-int8", "engine"]
    check_options(requested({"trt"}), {"max_batch": 32, "opset": 17})
    with pytest.raises(ValueError, match="--max-batch applies to the engine format"):
        check_options(requested(set()), {"max_batch": 32})
    with pytest.raises(TypeError, match="unknown option --colour"):
        check_options(requested(set()), {"colour": 1})
    assert _format("torch", "auto", "cuda").precision == "fp32"  # fp16: with a parity record
    assert _format("torch", "auto", "cpu").precision == "fp32"
    assert _format("onnxruntime", "int8", "cpu").name == "onnx-int8"
    with pytest.raises(ValueError, match=r"precision 'bf16' not offered \(fp32, int8\)"):
        _format("onnxruntime", "bf16", "cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny_cnn mclSTExp checkpoint and a random bank built from it."""
    from mclx.bank import Bank
    from mclx.checkpoint import load_checkpoint, save_checkpoint
    from mclx.models import create_model, model_cfg

    torch.manual_seed(0)
    net = create_model(model_cfg("mclstexp", encoder="tiny_cnn", n_genes=5, pos_size=(4, 4)))
    path = tmp_path_factory.mktemp("tiny") / "m.pt"
    pre = PreprocessCfg(genes=tuple("abcde"), patch_size=32)
    save_checkpoint(path, net, preprocess=pre)
    ck = load_checkpoint(path)
    rng = np.random.default_rng(2)
    n = 60
    bank = Bank(
        embeddings=rng.standard_normal((n, 256)).astype(np.float32),
        expressions=rng.random((n, 5)).astype(np.float32),
        genes=list("abcde"),
        sections=np.array(["s"] * n),
        spot_ids=np.array([str(i) for i in range(n)]),
        coords=np.zeros((n, 2)),
        positions=np.zeros((n, 2), np.int64),
        fingerprint=ck.fingerprint,
        checkpoint=str(path),
        model="mclstexp",
        k=7,
        distance="l2",
        weighting="inverse_square",
    )
    return ck, bank


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_predict_matches_float64_formula(tiny, distance):
    """Patches -> model in float64 -> cosine top-k -> inverse-square distance weights."""
    from mclx.inference import predict
    from mclx.inference.encoders import TorchEncoder

    ck, bank = tiny
    patches = np.random.default_rng(3).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    got = predict(TorchEncoder(ck), patches, bank, distance=distance, batch_size=4)
    model = ck.model.double().eval()
    with torch.no_grad():
        x = torch.from_numpy(patches.transpose(0, 3, 1, 2).astype(np.float64) / 255)
        q = model(x).numpy()
    ck.model.float()
    keys, values = bank.embeddings.astype(np.float64), bank.expressions.astype(np.float64)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        keys / np.linalg.norm(keys, axis=1, keepdims=True)
    ).T
    expected = np.empty((len(q), 5))
    for i, row in enumerate(cos):
        top = np.argsort(-row)[: bank.k]
        diff = keys[top] - q[i]
        d = np.abs(diff).sum(1) if distance == "l1" else np.sqrt((diff**2).sum(1))
        w = d**-2 / (d**-2).sum()
        expected[i] = w @ values[top]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_predict_refuses_a_bank_of_another_checkpoint(tiny):
    from dataclasses import replace

    from mclx.errors import FingerprintMismatch
    from mclx.inference import predict
    from mclx.inference.encoders import TorchEncoder

    ck, bank = tiny
    other = replace(bank, fingerprint="0" * 16)
    patches = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(FingerprintMismatch, match="rebuild the bank"):
        predict(TorchEncoder(ck), patches, other)
    with pytest.raises(ValueError, match="k=61 is larger than the bank"):
        predict(TorchEncoder(ck), patches, bank, k=61)


def test_regression_model_predicts_without_a_bank(tmp_path):
    """ST-Net's image output is the prediction itself: `match` with no bank passes it."""
    from mclx.checkpoint import load_checkpoint, save_checkpoint
    from mclx.inference import predict
    from mclx.inference.encoders import TorchEncoder
    from mclx.models import create_model, model_cfg

    net = create_model(model_cfg("stnet", encoder="tiny_cnn", n_genes=3))
    save_checkpoint(tmp_path / "s.pt", net, preprocess=PreprocessCfg(genes=("a", "b", "c")))
    ck = load_checkpoint(tmp_path / "s.pt")
    patches = np.random.default_rng(4).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        direct = net.eval()(torch.from_numpy(patches.transpose(0, 3, 1, 2) / 255).float())
    np.testing.assert_allclose(predict(TorchEncoder(ck), patches), direct.numpy(), rtol=1e-5)


def test_bf16_encoder_is_frozen_once_and_then_loaded_from_the_cache(tiny, tmp_path, monkeypatch):
    """The traced, frozen bf16 model is cached by fingerprint and torch version: a second
    encoder loads it (tracing would fail here) and gives the same embeddings; a torn
    cache entry is rebuilt, an unwritable cache folder skipped."""
    from mclx.inference.encoders import TorchEncoder

    ck, _ = tiny
    monkeypatch.setenv("MCLX_CACHE_DIR", str(tmp_path / "cache"))
    patches = np.random.default_rng(5).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    first = TorchEncoder(ck, precision="bf16")
    first.warm_up()
    (entry,) = (tmp_path / "cache" / "torchscript").iterdir()
    assert entry.name.startswith(f"{ck.fingerprint}-bf16-") and entry.suffix == ".pt"
    want = first(patches)
    fp32 = TorchEncoder(ck)(patches)
    cos = (want * fp32).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cos.min() >= 0.99  # it is the checkpoint's model, in bf16

    def no_trace(*a, **k):
        raise AssertionError("traced again instead of loading the cached model")

    with monkeypatch.context() as m:
        m.setattr(torch.jit, "trace", no_trace)
        np.testing.assert_array_equal(TorchEncoder(ck, precision="bf16")(patches), want)
    entry.write_bytes(entry.read_bytes()[:100])  # torn
    np.testing.assert_array_equal(TorchEncoder(ck, precision="bf16")(patches), want)
    assert entry.stat().st_size > 100  # rebuilt and saved again
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("MCLX_CACHE_DIR", str(blocked))
    np.testing.assert_array_equal(TorchEncoder(ck, precision="bf16")(patches), want)


def test_kernel_warm_up_fills_numba_cache_that_the_next_process_loads(tmp_path):
    """`python -m mclx.kernels.warm` (run by make install) compiles every CPU kernel into
    the cache; a later process warming up loads all of them and compiles none."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-m", "mclx.kernels.warm"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0 and "CPU retrieval kernels ready" in res.stderr, res.stderr
    count = (
        "from mclx.kernels import cpu_select as cs\n"
        "from mclx.kernels.warm import warm_up\n"
        "warm_up()\n"
        "ks = [getattr(cs, n) for n in dir(cs) if hasattr(getattr(cs, n), 'stats')]\n"
        "ks = [k for k in ks if k._cache.__class__.__name__ != 'NullCache']\n"
        "cold = [k.__name__ for k in ks if not sum(k.stats.cache_hits.values())]\n"
        "print(len(ks), sum(sum(k.stats.cache_misses.values()) for k in ks), *cold)\n"
    )
    res = subprocess.run([sys.executable, "-c", count], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    kernels, misses, *cold = res.stdout.split()
    assert int(kernels) >= 7 and int(misses) == 0 and not cold  # every kernel, from the cache
