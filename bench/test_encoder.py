"""Encoder backends side by side on DenseNet-121 (+ projection head), 224 px patches.

PyTorch eager FP32 vs PyTorch BF16 autocast (channels-last) vs ONNX Runtime FP32 vs ONNX
Runtime INT8 (vs TensorRT FP16 where present), at batch 32 and 64; images/s and the
embedding cosine against FP32 in extra_info. ``test_pcc_on_held_out_section`` reports
PCC(ACG) on C2 when the queries come from each backend (model trained on C3-C6).

    pytest bench/test_encoder.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mclx.export.backends import create_backend
from mclx.export.parity import compare

HER2ST = Path(os.environ.get("MCLX_HER2ST", Path(__file__).parents[2] / "shared/data/her2st"))
BACKENDS = [
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("tensorrt", "fp16"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A DenseNet-121 mclSTExp checkpoint (frozen-encoder training on C3-C6), its bank and
    its exports; real patches of C2 for timing and scoring."""
    from mclx.bank import build_bank, save_bank
    from mclx.data.her2st import read_section
    from mclx.data.patches import section_patches

    if not (HER2ST / "data" / "ST-cnts").is_dir():
        pytest.skip(f"her2st data not found at {HER2ST}")
    d = tmp_path_factory.mktemp("encoder_bench")
    ck = Path(os.environ.get("MCLX_BENCH_CKPT", d / "model.pt"))
    if not ck.is_file():
        cmd = [
            "train",
            "--data",
            HER2ST,
            "--sections",
            "C3,C4,C5,C6",
            "--freeze-encoder",
            "--epochs",
            "90",
            "-q",
            "--out",
            ck,
        ]
        subprocess.run([sys.executable, "-m", "mclx", *map(str, cmd)], check=True)
    if not ck.with_suffix(".int8.onnx").is_file():
        from mclx.export.exporter import export

        export(ck, int8=True, calib_data=HER2ST, n_patches=64, log=lambda *_: None)
    bank = save_bank(build_bank(ck, HER2ST, sections=["C3", "C4", "C5", "C6"]), d / "bank.npz")
    c2 = read_section(HER2ST, "C2")
    return ck, bank, c2, section_patches(c2, 224)


def _open(ck, backend, precision):
    try:
        return create_backend(
            ck,
            backend=backend,
            precision=precision,
            device="cuda" if backend == "tensorrt" else "cpu",
        )
    except (ImportError, RuntimeError, FileNotFoundError) as exc:
        pytest.skip(f"{backend}/{precision} unavailable: {exc}")


@pytest.mark.parametrize("batch", [32, 64])
@pytest.mark.parametrize(("backend", "precision"), BACKENDS, ids=[f"{b}-{p}" for b, p in BACKENDS])
def test_encoder_throughput(benchmark, setup, backend, precision, batch):
    ck, _, _, patches = setup
    enc = _open(ck, backend, precision)
    x = patches[:batch]
    enc(x[:2])  # warm-up: sessions, autotuning, thread pools
    benchmark.group = f"encoder batch {batch}"
    out = benchmark.pedantic(enc, args=(x,), rounds=3, iterations=1, warmup_rounds=1)
    ref = _open(ck, "torch", "fp32")(x)
    out = out.get() if hasattr(out, "get") else out
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.min
    benchmark.extra_info.update({f"vs_fp32_{k}": v for k, v in compare(ref, out).items()})


@pytest.mark.parametrize(("backend", "precision"), BACKENDS, ids=[f"{b}-{p}" for b, p in BACKENDS])
def test_pcc_on_held_out_section(benchmark, setup, backend, precision):
    from mclx.bank import load_bank
    from mclx.data.dataset import build_table
    from mclx.kernels import retrieve
    from mclx.metrics import score

    ck, bank_path, c2, patches = setup
    enc = _open(ck, backend, precision)
    bank = load_bank(bank_path)
    truth = build_table({"C2": c2}, enc.pre).expr
    benchmark.group = "PCC(ACG) on C2 by query backend"

    def run():
        emb = np.concatenate(
            [np.asarray(enc(patches[i : i + 64])) for i in range(0, len(patches), 64)]
        )
        return score(retrieve(emb, bank.embeddings, bank.expressions, 200), truth)

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({k: res[k] for k in ("pcc_acg", "pcc_heg", "mse", "mae")})
    print(f"{backend}/{precision}: PCC(ACG) {res['pcc_acg']:.5f} PCC(HEG) {res['pcc_heg']:.5f}")
