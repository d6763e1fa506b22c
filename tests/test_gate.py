"""The parity gate on the task (#27): reduced precision judged by retrieval and the
predicted expression on held-back calibration spots, the head kept in FP32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mclx.checkpoint import load_checkpoint, save_checkpoint
from mclx.config import ModelCfg, PreprocessCfg
from mclx.data.synthetic import write_synthetic_her2st
from mclx.export.calib import calibration_set
from mclx.export.exporter import ParityError, export
from mclx.export.gate import judge
from mclx.inference import FORMATS
from mclx.inference.encoders import TorchEncoder
from mclx.inference.formats import TASK_GATE, parity_held, read_report
from mclx.inference.transform import to_tensor

GENES = tuple(f"GENE{i:03d}" for i in range(40))


def _default_recipe_ckpt(path, data, seed=0, norm=True):
    """A tiny model with standardised frozen features (``--recipe default``), its
    statistics from the synthetic sections' patches, as training sets them (``norm``
    False: the paper recipe, features as they are)."""
    pre = PreprocessCfg(genes=GENES, mpp=None)
    torch.manual_seed(seed)
    net = create(pre, norm).eval()
    if not norm:
        save_checkpoint(path, net, preprocess=pre)
        return path
    cal = calibration_set(data, _Ck(net, pre), n=200, n_calib=0)
    with torch.no_grad():
        feats = net.image_encoder(to_tensor(cal.patches, pre, "cpu")).numpy()
    net.set_feature_stats(feats)
    save_checkpoint(path, net, preprocess=pre)
    return path


def create(pre, norm=True):
    from mclx.models import create_model

    cfg = ModelCfg(
        encoder="tiny_cnn", n_genes=len(pre.genes), pos_size=(64, 64), k=5, feature_norm=norm
    )
    return create_model(cfg)


class _Ck:
    """What calibration_set reads of a checkpoint, before one is saved."""

    def __init__(self, model, pre) -> None:
        self.model, self.preprocess, self.fingerprint = model, pre, ""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_her2st(tmp_path_factory.mktemp("gate_data"), grid=(12, 12))


@pytest.fixture(scope="module")
def model(tmp_path_factory, data):
    return _default_recipe_ckpt(tmp_path_factory.mktemp("gate") / "model.pt", data)


def test_calibration_holds_spots_back_with_their_expression(model, data):
    ck = load_checkpoint(model)
    cal = calibration_set(data, ck, n=30, n_calib=40)
    assert cal.patches.shape == (30, 224, 224, 3) and cal.calib.shape[0] == 40
    assert cal.truth.shape == (30, len(GENES))
    # the bank is every spot but the held-back ones: 3 sections of 144 spots
    assert len(cal.bank) == 3 * 144 - 30
    held = {tuple(p.reshape(-1)[:64]) for p in cal.patches}
    assert not held & {tuple(p.reshape(-1)[:64]) for p in cal.calib}


def test_judge_against_brute_force(model, data):
    ck = load_checkpoint(model)
    cal = calibration_set(data, ck, n=40, n_calib=0)
    ref = TorchEncoder(ck)(cal.patches)
    same = judge(ref, ref.copy(), cal)
    assert same["topk_overlap"] == 1.0 and same["gene_corr_median"] == pytest.approx(1.0)
    assert same["pcc_acg"] == pytest.approx(same["pcc_acg_fp32"])
    shuffled = ref[np.random.default_rng(0).permutation(len(ref))]
    got = judge(ref, shuffled, cal)
    # brute force: each query's top-k by cosine, in plain Python
    b = cal.bank.embeddings / np.linalg.norm(cal.bank.embeddings, axis=1, keepdims=True)

    def top(e):
        s = b @ (e / np.linalg.norm(e))
        return set(np.argsort(-s)[: cal.bank.k].tolist())

    want = np.mean([len(top(x) & top(y)) / cal.bank.k for x, y in zip(ref, shuffled)])
    assert got["topk_overlap"] == pytest.approx(want)
    assert got["topk_overlap"] < TASK_GATE["topk_overlap"]


def test_auto_reads_the_task_not_the_cosine():
    good = {"topk_overlap": 0.9, "gene_corr_median": 0.98, "pcc_acg": 0.20, "pcc_acg_fp32": 0.2}
    bad = {**good, "topk_overlap": 0.1}
    assert parity_held("openvino-int8", {"openvino-int8": {"min_cosine": 0.7, "task": good}})
    assert not parity_held("openvino-int8", {"openvino-int8": {"min_cosine": 1.0, "task": bad}})
    drop = {**good, "pcc_acg": 0.2 - 2 * TASK_GATE["pcc_acg_drop"]}
    assert not parity_held("torch-bf16", {"torch-bf16": {"min_cosine": 1.0, "task": drop}})
    # recorded without a task (no expression): the cosine is the gate
    assert not parity_held("onnx-int8", {"onnx-int8": {"min_cosine": 0.98}})


@pytest.fixture(scope="module")
def paper(tmp_path_factory, data):
    return _default_recipe_ckpt(tmp_path_factory.mktemp("paper") / "model.pt", data, norm=False)


def test_faithful_int8_passes_with_head_in_fp32(paper, data):
    # the paper recipe: tiny_cnn's INT8 trunk is not faithful enough for standardised
    # features of a random tiny encoder (top-5 overlap 0.42); DenseNet-121's: see docs
    model = paper
    report = export(model, int8=True, calib_data=data, n_patches=48, log=lambda *_: None)
    entry = report["onnx-int8"]
    assert entry["gate"] == "task" and entry["held"] and entry["task"]["spots"] == 48
    assert "/image_projection/projection/Gemm" in entry["fp32_layers"]
    assert FORMATS["onnx-int8"].path(model).is_file()
    assert read_report(model)["onnx-int8"]["task"] == json.loads(json.dumps(entry["task"]))


def _perturbed_int8(original):
    """``quantize_int8`` whose file then has every convolution's per-channel weight
    scales flipped in sign on every other channel: a broken artifact."""

    def build(fp32, out, calib, **kw):
        import onnx
        from onnx import numpy_helper

        original(fp32, out, calib, **kw)
        proto = onnx.load(str(out))
        inits = {t.name: t for t in proto.graph.initializer}
        for node in proto.graph.node:
            scale = inits.get(node.input[1]) if node.op_type == "DequantizeLinear" else None
            if scale is not None and numpy_helper.to_array(scale).size > 1:
                arr = numpy_helper.to_array(scale).copy()
                arr[::2] *= -1
                scale.CopyFrom(numpy_helper.from_array(arr, scale.name))
        onnx.save(proto, str(out))
        return out

    return build


def test_int8_with_a_perturbed_layer_is_refused(paper, data, monkeypatch, tmp_path):
    import shutil

    from mclx.export import onnx_export

    ck = tmp_path / "model.pt"
    shutil.copy(paper, ck)
    monkeypatch.setattr(onnx_export, "quantize_int8", _perturbed_int8(onnx_export.quantize_int8))
    with pytest.raises(ParityError, match="onnx-int8 parity failed on the task"):
        export(ck, int8=True, calib_data=data, n_patches=48, log=lambda *_: None)
    assert not FORMATS["onnx-int8"].path(ck).exists()
    # the refusal costs only its own row: the FP32 file and the report are there, and
    # the report says why INT8 is missing (auto never takes it)
    assert FORMATS["onnx"].path(ck).is_file()
    report = read_report(ck)
    assert "parity failed on the task" in report["onnx-int8"]["refused"]
    assert not parity_held("onnx-int8", report)


def test_perturbed_layer_fails_the_gate(model, data):
    ck = load_checkpoint(model)
    cal = calibration_set(data, ck, n=48, n_calib=0)
    ref = TorchEncoder(ck)(cal.patches)
    with torch.no_grad():
        conv = next(m for m in ck.model.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
        conv.weight.add_(torch.randn_like(conv.weight) * conv.weight.std() * 3)
    got = TorchEncoder(ck)(cal.patches)
    assert not parity_held("onnx-int8", {"onnx-int8": {"task": judge(ref, got, cal)}})


def test_torch_bf16_runs_the_head_in_fp32(model, data):
    from mclx.kernels import cpu_has_fast_bf16

    if not cpu_has_fast_bf16():
        pytest.skip("no bf16 arithmetic on this CPU")
    ck = load_checkpoint(model)
    cal = calibration_set(data, ck, n=16, n_calib=0)
    got = TorchEncoder(ck, precision="bf16")(cal.patches)
    x = to_tensor(cal.patches, ck.preprocess, "cpu")
    with torch.no_grad():
        feats = ck.model.image_encoder.bfloat16()(x.bfloat16()).float()
        ck.model.image_encoder.float()
        want = ck.model.embed_image_features(feats).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_openvino_bf16_runs_the_head_in_f32(model, tmp_path):
    from mclx.kernels import cpu_has_fast_bf16

    ov = pytest.importorskip("openvino")
    if not cpu_has_fast_bf16():
        pytest.skip("no bf16 arithmetic on this CPU")
    from mclx.export.onnx_export import export_onnx
    from mclx.inference.openvino import OpenVinoEncoder, trunk_output

    ck = load_checkpoint(model)
    onnx = export_onnx(ck, tmp_path / "model.onnx")
    assert trunk_output(onnx).startswith("/image_encoder/")
    x = np.random.default_rng(0).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
    split = OpenVinoEncoder(onnx, precision="bf16")
    assert split.head is not None
    from mclx.inference.transform import to_model_input

    feed = {"images": to_model_input(x, ck.preprocess)}
    feats = next(iter(split.request.infer(feed).values()))  # the bf16 trunk's output
    with torch.no_grad():  # the reference: PyTorch's float32 head on those features
        want = ck.model.embed_image_features(torch.as_tensor(np.array(feats))).numpy()
    whole = ov.Core().compile_model(str(onnx), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    err_split = np.abs(split(x) - want).max()
    assert err_split < 1e-4
    assert np.abs(whole(feed)[0] - want).max() > 10 * err_split  # bf16 head: far off


def test_auto_ranks_by_the_rates_measured_on_this_machine():
    from mclx.inference.formats import host, ranked

    names = ["openvino-bf16", "torch-bf16", "openvino-int8", "torch"]
    report = {
        "host": host(),
        "reference": {"format": "torch", "rate": 10.0},
        "openvino-bf16": {"rate": 40.0},
        "torch-bf16": {"rate": 20.0},
        "openvino-int8": {"rate": 60.0},
    }
    assert ranked(names, report) == ["openvino-int8", "openvino-bf16", "torch-bf16", "torch"]
    # measured elsewhere, or not every rate measured: the table's order
    assert ranked(names, {**report, "host": "another CPU x64"}) == names
    assert ranked(names, {**report, "torch-bf16": {}}) == names


def test_the_chosen_format_and_its_gate_go_into_the_predictions(paper, data):
    import anndata as ad

    from mclx.inference import open_encoder
    from mclx.wsi.runtime import parity_record

    if "onnx-int8" not in read_report(paper):  # run alone, without the export test
        export(paper, int8=True, calib_data=data, n_patches=48, log=lambda *_: None)
    enc = open_encoder(paper, device="cpu")
    rec = parity_record(enc)
    assert rec["format"] in FORMATS and rec["held"] is True
    report = read_report(paper)
    assert report["host"] and report["reference"]["rate"] > 0
    a = ad.AnnData(np.zeros((1, 1), np.float32))
    a.uns["parity"] = rec  # plain values only: an .h5ad stores them
    a.write_h5ad(paper.with_name("p.h5ad"))


def test_a_non_finite_embedding_fails_the_gate_without_crashing():
    from types import SimpleNamespace

    from mclx.export.gate import failures

    cal = SimpleNamespace(truth=np.ones((3, 4), np.float32), bank=None)
    ref = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = ref.copy()
    got[1, 2] = np.nan  # bf16 overflow in a ViT, say
    task = judge(ref, got, cal)
    assert task["nonfinite_rows"] == 1
    assert not parity_held("torch-bf16", {"torch-bf16": {"min_cosine": 1.0, "task": task}})
    assert failures(task)[0] == "1 embeddings not finite"
