"""Encoder backends side by side on DenseNet-121 (+ projection head), 224 px patches.

PyTorch eager FP32 vs PyTorch BF16 (frozen TorchScript, channels-last) vs ONNX Runtime
FP32 / INT8 vs OpenVINO FP32 / BF16 / INT8 (on the same ONNX files; with the openvino
extra) (vs TensorRT FP16 where present), at batch 32 and 64; images/s and the
embedding cosine against FP32 in extra_info. ``test_pcc_on_held_out_section`` reports
PCC(ACG) on C2 when the queries come from each backend (model trained on C3-C6).

    pytest bench/test_encoder.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest

from mclx.export.parity import compare
from mclx.inference import FORMATS, open_encoder, to_host

BACKENDS = [
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
    ("tensorrt", "fp16"),
]


def _open(ck, backend, precision, failures=None):
    for fmt in FORMATS.values():
        if (fmt.backend, fmt.precision) == (backend, precision) and fmt.name in (failures or {}):
            pytest.skip(
                f"{backend}/{precision}: export refused by its parity gate: {failures[fmt.name]}"
            )
    try:
        return open_encoder(
            ck,
            backend=backend,
            precision=precision,
            device="cuda" if backend == "tensorrt" else "cpu",
        )
    except (ImportError, RuntimeError, FileNotFoundError) as exc:
        pytest.skip(f"{backend}/{precision} unavailable: {exc}")


@pytest.mark.parametrize("batch", [32, 64])
@pytest.mark.parametrize(("backend", "precision"), BACKENDS, ids=[f"{b}-{p}" for b, p in BACKENDS])
def test_encoder_throughput(benchmark, her2st_model, export_failures, backend, precision, batch):
    ck, _, _, patches = her2st_model
    enc = _open(ck, backend, precision, export_failures)
    x = patches[:batch]
    enc(x[:2])  # warm-up: sessions, autotuning, thread pools
    benchmark.group = f"encoder batch {batch}"
    out = benchmark.pedantic(enc, args=(x,), rounds=3, iterations=1, warmup_rounds=1)
    ref = _open(ck, "torch", "fp32")(x)
    out = to_host(out)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.min
    # DenseNet-121: 5.7 GFLOP per image; bench/test_peak.py has the cores' limit
    benchmark.extra_info["tflops"] = benchmark.extra_info["images_per_s"] * 5.7e-3
    benchmark.extra_info.update({f"vs_fp32_{k}": v for k, v in compare(ref, out).items()})


@pytest.mark.parametrize(("backend", "precision"), BACKENDS, ids=[f"{b}-{p}" for b, p in BACKENDS])
def test_pcc_on_held_out_section(benchmark, her2st_model, export_failures, backend, precision):
    from mclx.bank import load_bank
    from mclx.data.dataset import build_table
    from mclx.evaluation.metrics import score
    from mclx.inference import predict

    ck, bank_path, c2, patches = her2st_model
    enc = _open(ck, backend, precision, export_failures)
    bank = load_bank(bank_path)
    truth = build_table({"C2": c2}, enc.pre).expr
    benchmark.group = "PCC(ACG) on C2 by query backend"

    def run():
        return score(predict(enc, patches, bank, k=200), truth)

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({k: res[k] for k in ("pcc_acg", "pcc_heg", "mse", "mae")})
    print(f"{backend}/{precision}: PCC(ACG) {res['pcc_acg']:.5f} PCC(HEG) {res['pcc_heg']:.5f}")
