"""Benchmarks: `pytest --benchmark-only` from the repository root (or `make bench`).

They are collected only under ``--benchmark-only``: a plain ``pytest`` (``make test``)
never imports them, and ``pytest --benchmark-only`` collects nothing but them.

Shared fixtures: :func:`her2st_model`, a DenseNet-121 checkpoint trained on HER2+ C3-C6
with its bank and exports, and the patches of the held-out section C2 (built once per
session, used by ``test_encoder.py`` and ``test_pipeline.py``). Random banks for the
retrieval benchmarks are in ``banks.py``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


def pytest_ignore_collect(collection_path, config):
    """Benchmarks only under --benchmark-only (None: let other rules decide)."""
    return None if config.getoption("benchmark_only", default=False) else True


HER2ST = Path(os.environ.get("MCLX_HER2ST", Path(__file__).parents[2] / "shared/data/her2st"))


@pytest.fixture(scope="session")
def export_failures() -> dict[str, str]:
    """Format name (``FORMATS``) -> why :func:`her2st_model`'s export of it failed (a
    parity gate)."""
    return {}


@pytest.fixture(scope="session")
def her2st_model(tmp_path_factory, export_failures):
    """(checkpoint, bank path, C2 AnnData, C2 patches): an mclSTExp checkpoint
    (frozen-encoder training on C3-C6, or ``$MCLX_BENCH_CKPT``) with its ONNX / INT8
    exports and a bank of C3-C6; skipped without the her2st data."""
    from mclx.bank import build_bank, save_bank
    from mclx.checkpoint import load_checkpoint
    from mclx.data.her2st import read_section
    from mclx.data.patches import model_patches
    from mclx.inference import FORMATS

    if not (HER2ST / "data" / "ST-cnts").is_dir():
        pytest.skip(f"needs the her2st data: not found at {HER2ST} (set MCLX_HER2ST)")
    d = tmp_path_factory.mktemp("her2st_model")
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
    from mclx.export.exporter import ParityError, export

    for fmt in FORMATS.values():  # the INT8 rows: calibrated exports of their own
        if fmt.precision != "int8" or fmt.path(ck).is_file():
            continue
        if fmt.backend == "openvino" and importlib.util.find_spec("openvino") is None:
            continue
        try:
            export(ck, calib_data=HER2ST, n_patches=64, log=lambda *_: None, **{fmt.flag: True})
        except ParityError as exc:  # the FP32 file stays; the INT8 rows say why they skip
            export_failures[fmt.name] = str(exc)
    if not FORMATS["onnx"].path(ck).is_file():
        export(ck, log=lambda *_: None)
    bank = save_bank(build_bank(ck, HER2ST, sections=["C3", "C4", "C5", "C6"]), d / "bank.npz")
    c2 = read_section(HER2ST, "C2")
    return ck, bank, c2, model_patches(c2, load_checkpoint(ck).preprocess)
