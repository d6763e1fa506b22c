"""The GPU path's logic where a CPU can check it (issue 11): one ONNX Runtime build per
install, ONNX Runtime CUDA sessions that silently fall back to the CPU, CuPy queries
against a host bank, a bank kept as torch CUDA tensors without CuPy, which encoder
``auto`` may take on a GPU, and ``cuda:N``. GPU libraries are stood in for by
``helpers.fake_gpu`` where their API shape is what matters."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from helpers import assert_one_line_error, fake_gpu, needs, run_cli

from mclx.checkpoint import load_checkpoint, save_checkpoint
from mclx.config import ModelCfg, PreprocessCfg
from mclx.models import create_model

ROOT = Path(__file__).resolve().parents[1]
ORT_DISTS = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"}


# --- packaging: one ONNX Runtime ----------------------------------------------------


def _requirements(extras: set[str]) -> list[str]:
    """Names of the distributions ``pip install .[extras]`` asks for (self-references
    such as ``mclx[cpu]`` followed)."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names, todo, seen = [], list(project["dependencies"]), set()
    todo += [r for e in extras for r in project["optional-dependencies"][e]]
    while todo:
        req = Requirement(todo.pop())
        if req.name == project["name"]:
            todo += [r for e in req.extras - seen for r in project["optional-dependencies"][e]]
            seen |= req.extras
            continue
        names.append(req.name.lower())
    return names


@pytest.mark.parametrize("extras", [{"gpu"}, {"gpu", "dev"}, {"cpu"}, {"cpu", "dev"}])
def test_each_install_has_exactly_one_onnxruntime(extras):
    """onnxruntime and onnxruntime-gpu write the same package: installing both leaves
    whichever pip wrote last, and the CPU build hides the CUDA provider."""
    found = [n for n in _requirements(extras) if n in ORT_DISTS]
    assert len(found) == 1, f"pip install .[{','.join(sorted(extras))}] installs {found}"
    assert found == (["onnxruntime-gpu"] if "gpu" in extras else ["onnxruntime"])


def test_gpu_extra_is_one_cuda_major_and_makefile_keeps_the_builds_apart():
    """torch 2.14.1 on PyPI is built for CUDA 13: every CUDA-specific package of the gpu
    extra is a CUDA 13 build; no Makefile install line mixes the cpu and gpu extras."""
    majors = {}
    for name in _requirements({"gpu"}):
        m = re.fullmatch(r"cupy-cuda(\d+)x|tensorrt-cu(\d+)", name)
        if m:
            majors[name] = int(m.group(1) or m.group(2))
    assert set(majors) == {"cupy-cuda13x", "tensorrt-cu13"} and set(majors.values()) == {13}
    installs = re.findall(r'-e "\.\[([a-z,]+)\]"', (ROOT / "Makefile").read_text())
    assert installs and all(not {"cpu", "gpu"} <= set(i.split(",")) for i in installs)


def test_gpu_extra_on_python_3_10_installs_without_onnxruntime_gpu():
    """onnxruntime-gpu >= 1.29 has no cp310 wheels: ``pip install .[gpu]`` failed on
    Python 3.10, which requires-python admits. Its requirement carries a marker, and the
    GPU check says why ONNX Runtime's CUDA build is missing there."""
    from packaging.requirements import Requirement

    from mclx.gpu_check import environment

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (ort,) = [
        Requirement(r)
        for r in project["optional-dependencies"]["gpu"]
        if r.startswith("onnxruntime")
    ]
    assert ort.name == "onnxruntime-gpu" and project["requires-python"] == ">=3.10"
    assert not ort.marker.evaluate({"python_version": "3.10"})
    assert ort.marker.evaluate({"python_version": "3.11"})
    assert ort.marker.evaluate({"python_version": "3.12"})
    why = environment.onnxruntime_cuda_missing(python=(3, 10))
    assert "Python 3.10" in why and "3.11" in why


def test_missing_onnxruntime_is_one_line(monkeypatch, tmp_path):
    from mclx.inference.device import import_onnxruntime, onnxruntime_cuda

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(RuntimeError, match=r"m\.onnx: ONNX Runtime is not installed .*mclx\[cpu\]"):
        import_onnxruntime("m.onnx")
    assert onnxruntime_cuda() is False


def test_installed_onnxruntime_is_found_by_its_files():
    from mclx.inference.device import onnxruntime_distributions

    assert onnxruntime_distributions() in (["onnxruntime"], ["onnxruntime-gpu"])


# --- ONNX Runtime CUDA sessions -----------------------------------------------------


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from mclx.export.onnx_export import export_onnx

    torch.manual_seed(0)
    net = create_model(ModelCfg(encoder="tiny_cnn", n_genes=4, pos_size=(4, 4))).eval()
    path = tmp_path_factory.mktemp("ort") / "m.pt"
    save_checkpoint(path, net, preprocess=PreprocessCfg(genes=tuple("abcd"), patch_size=32))
    return export_onnx(load_checkpoint(path), path.with_suffix(".onnx"))


def test_cuda_session_that_runs_on_the_cpu_is_refused(onnx_model, monkeypatch):
    """The CUDA provider is listed but does not start (no CUDA / cuDNN libraries):
    ONNX Runtime warns and runs on the CPU. That must be an error, not a quiet CPU run."""
    import onnxruntime as ort

    from mclx.inference.encoders import OnnxRuntimeEncoder

    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    with pytest.raises(RuntimeError, match="did not start its CUDA provider on cuda:1") as err:
        OnnxRuntimeEncoder(onnx_model, device="cuda:1")
    assert "\n" not in str(err.value) and "providers: CPUExecutionProvider" in str(err.value)


def test_cuda_provider_asks_for_the_chosen_gpu(onnx_model, monkeypatch):
    import onnxruntime as ort

    from mclx.inference.encoders import OnnxRuntimeEncoder

    seen = {}

    class Session:
        def __init__(self, path, so, providers):
            seen["providers"] = providers

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    enc = OnnxRuntimeEncoder(onnx_model, device="cuda:2")
    assert seen["providers"][0] == ("CUDAExecutionProvider", {"device_id": 2, "use_tf32": 0})
    assert enc.device == "cuda:2"


def test_both_onnxruntime_builds_installed_is_named(onnx_model, monkeypatch):
    """Both builds installed: the CPU build's files won, so no CUDA provider is listed
    (stood in for here, so that the test holds in a gpu venv as in a cpu one)."""
    import onnxruntime as ort

    import mclx.inference.encoders as encoders
    from mclx.inference.encoders import OnnxRuntimeEncoder

    both = ["onnxruntime", "onnxruntime-gpu"]
    monkeypatch.setattr(encoders, "onnxruntime_distributions", lambda: both)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="onnxruntime and onnxruntime-gpu are both installed"):
        OnnxRuntimeEncoder(onnx_model, device="cuda")


# --- retrieval and the bank across array types ----------------------------------------


def _bank_arrays(seed=0, n=300, d=16, g=5, q=9):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(q, d)).astype(np.float32),
        rng.normal(size=(n, d)).astype(np.float32),
        rng.gamma(1.0, size=(n, g)).astype(np.float32),
    )


def test_cupy_queries_against_a_host_bank_come_back_as_cupy(monkeypatch):
    """`--device cpu` with an engine: the engine's embeddings are CuPy arrays, the bank
    is in host memory. CuPy cannot import host memory through DLPack (TypeError)."""
    from mclx.kernels import retrieve, retrieve_reference

    _, cp = fake_gpu.install(monkeypatch, trt_major=None)
    q, keys, vals = _bank_arrays()
    pred = retrieve(cp.asarray(q), keys, vals, 7)
    assert isinstance(pred, cp.ndarray)
    ref, _ = retrieve_reference(q, keys, vals, 7)
    np.testing.assert_allclose(pred.get(), ref, rtol=1e-5, atol=1e-6)


def _bank(n=300):
    from mclx.bank import Bank

    _, keys, vals = _bank_arrays(n=n)
    return Bank(
        embeddings=keys, expressions=vals, genes=list("abcde"), sections=np.array(["s"] * n),
        spot_ids=np.arange(n).astype(str), coords=np.zeros((n, 2)),
        positions=np.zeros((n, 2), np.int64), fingerprint="f", checkpoint="", model="mclstexp",
        k=7, distance="l2", weighting="inverse_square",
    )  # fmt: skip


def test_bank_lives_as_torch_cuda_tensors_without_cupy(monkeypatch):
    """A CUDA machine without CuPy: the bank goes to the GPU as torch tensors (here CPU
    tensors stand in for them) and retrieval runs on them."""
    import mclx.bank as bank_mod
    import mclx.inference.device as device
    from mclx.inference import match, to_host
    from mclx.wsi.runtime import _concat

    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(device, "torch_cuda", lambda: True)
    asked = []

    def to_torch(array, dev):
        asked.append(dev)
        return torch.as_tensor(np.asarray(array, np.float32))

    monkeypatch.setattr(bank_mod, "_to_torch", to_torch)
    host = _bank()
    on_gpu = host.to_device("cuda:1")
    assert asked == ["cuda:1", "cuda:1"] and isinstance(on_gpu.embeddings, torch.Tensor)
    q, _, _ = _bank_arrays()
    got = match(q, on_gpu)
    assert isinstance(got, np.ndarray)  # the caller's (numpy) type
    np.testing.assert_allclose(got, match(q, host), rtol=1e-6)
    both = _concat([torch.as_tensor(q), torch.as_tensor(q)])
    np.testing.assert_array_equal(to_host(both), np.concatenate([q, q]))


def test_bank_follows_the_encoder_unless_device_cpu(monkeypatch):
    """An engine runs on its GPU whatever --device says; with --device cpu the bank
    stays on the host (CuPy embeddings matched on the CPU), else it joins the encoder."""
    from types import SimpleNamespace

    from mclx.bank import Bank
    from mclx.wsi.runtime import _array_device, place_bank

    moved = []
    monkeypatch.setattr(Bank, "to_device", lambda self, dev: moved.append(dev) or self)
    engine = SimpleNamespace(device="cuda:1")
    host = _bank()
    assert place_bank(host, engine, "cpu") is host and moved == []
    place_bank(host, engine, "auto")
    place_bank(host, SimpleNamespace(device="cpu"), "auto")
    assert moved == ["cuda:1"]
    assert _array_device(host.embeddings) == "cpu"
    assert _array_device(torch.zeros(1)) == "cpu"


def test_bank_without_any_gpu_is_one_line(monkeypatch):
    import mclx.inference.device as device

    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(device, "torch_cuda", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA GPU visible to CuPy or PyTorch"):
        _bank().to_device("cuda")


# --- which encoder auto takes; cuda:N -------------------------------------------------


def test_reduced_precision_needs_a_parity_record():
    """Without ``mclx export`` having measured torch fp16 against fp32 on this model,
    ``auto`` runs torch in fp32 on a GPU; with a good record it takes fp16."""
    from mclx.inference.choose import _format
    from mclx.inference.formats import auto_order, parity_held

    assert not parity_held("torch-fp16", {})
    assert parity_held("torch", {}) and parity_held("onnx", {})
    assert not parity_held("onnx", {"onnx": {"min_cosine": 0.5}})
    assert _format("torch", "auto", "cuda").precision == "fp32"
    good = {"torch-fp16": {"min_cosine": 0.9995}}
    assert _format("torch", "auto", "cuda:1", good).precision == "fp16"
    assert _format("tensorrt", "auto", "cuda").name == "engine"
    assert auto_order("cuda:3")[-1] == "torch" and auto_order("cpu")[-1] == "torch"


def test_cuda_n_devices(capsys):
    from mclx.inference.device import device_index, is_cuda, resolve_device, torch_cuda

    assert resolve_device("cuda:1") == "cuda:1" and device_index("cuda:1") == 1
    assert device_index("cuda") == 0 and is_cuda("cuda:12") and not is_cuda("cudax")
    for bad in ("cuda:", "cuda:-1", "gpu", "cuda:1:2"):
        with pytest.raises(ValueError, match="cuda:N"):
            resolve_device(bad)
    res = run_cli(capsys, ["infer", "s.png", "--bank", "b.npz", "--device", "gpu"])
    assert_one_line_error(res, "--device", "cuda:N")
    if not torch_cuda():
        res = run_cli(capsys, ["infer", "s.png", "--bank", "b.npz", "--device", "cuda:1"])
        assert res.returncode != 0 and "--device" not in res.stderr  # parsed; fails later


def test_fp32_on_a_gpu_runs_without_tf32():
    """PyTorch lets cuDNN use TF32 for float32 convolutions by default (10-bit
    mantissas): the FP32 encoder and the evaluation features turn it off meanwhile."""
    from mclx.inference.encoders import no_tf32

    cudnn = torch.backends.cudnn
    before = cudnn.allow_tf32
    with no_tf32():
        assert cudnn.allow_tf32 is False
    assert cudnn.allow_tf32 == before


# --- on a GPU: the same paths for real --------------------------------------------------


@needs("onnxruntime-cuda")
def test_real_onnxruntime_cuda_on_the_gpu(onnx_model):
    """ONNX Runtime's CUDA provider really starts (the gpu extra brings CUDA 13 and
    cuDNN 9), FP32 within 1e-4 of PyTorch on the CPU."""
    from mclx.export.parity import compare
    from mclx.inference.encoders import OnnxRuntimeEncoder, TorchEncoder

    ck = load_checkpoint(onnx_model.with_suffix(".pt"))
    x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    ref = TorchEncoder(ck)(x)
    ort_cuda = OnnxRuntimeEncoder(onnx_model, device="cuda")
    assert ort_cuda.session.get_providers()[0] == "CUDAExecutionProvider"
    assert compare(ref, ort_cuda(x))["max_rel_err"] <= 1e-4


@needs("gpu")
def test_real_torch_on_the_gpu(onnx_model):
    """PyTorch on the GPU: FP32 (TF32 off) within 1e-4 of the CPU, FP16 cosine >= 0.99;
    needs no ONNX Runtime CUDA build (a bare CUDA machine runs it)."""
    from mclx.export.parity import compare
    from mclx.inference.encoders import TorchEncoder

    ck = load_checkpoint(onnx_model.with_suffix(".pt"))
    x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    ref = TorchEncoder(ck)(x)
    assert compare(ref, TorchEncoder(ck, device="cuda")(x))["max_rel_err"] <= 1e-4
    fp16 = TorchEncoder(ck, precision="fp16", device="cuda")(x)
    assert compare(ref, fp16)["min_cosine"] >= 0.99


@needs("cupy")
def test_real_bank_on_the_gpu_predicts_what_the_host_bank_does():
    import cupy as cp

    from mclx.inference import match, to_host

    host = _bank(n=3000)
    on_gpu = host.to_device("cuda")
    assert isinstance(on_gpu.embeddings, cp.ndarray) and on_gpu.embeddings.dtype == cp.float32
    q, _, _ = _bank_arrays(n=3000)
    want = match(q, host)
    np.testing.assert_allclose(to_host(match(cp.asarray(q), on_gpu)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_host(match(q, on_gpu)), want, rtol=1e-5, atol=1e-6)
