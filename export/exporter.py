"""One export entry point: checkpoint -> ONNX FP32 (+ INT8, + TensorRT), each checked.

Every artifact is first written under a staging name, compared with PyTorch FP32 on the
same patches, and only then renamed into place: a failed parity check leaves the
previous good artifact untouched. The results go to ``<stem>.export.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mclx.errors import MclxError
from mclx.export.formats import MAX_REL_ERR_FP32, MIN_COSINE, artifact_path, report_path
from mclx.io import write_text_atomic


class ParityError(MclxError):
    """An exported encoder disagrees with PyTorch beyond the allowed bound."""


def _staging(path: Path) -> Path:
    return path.with_name(f".{path.name}.staging{''.join(path.suffixes[-1:])}")


def _check(name: str, path: Path, res: dict[str, float], precision: str) -> None:
    if precision == "fp32" and res["max_rel_err"] > MAX_REL_ERR_FP32:
        msg = (
            f"{path}: FP32 parity failed, max relative error {res['max_rel_err']:.2e} > "
            f"{MAX_REL_ERR_FP32:.0e}"
        )
        raise ParityError(msg)
    if res["min_cosine"] < MIN_COSINE:
        msg = f"{path}: {name} parity failed, min cosine {res['min_cosine']:.4f} < {MIN_COSINE}"
        raise ParityError(msg)


def export(
    checkpoint: str | os.PathLike,
    *,
    onnx_path: str | os.PathLike | None = None,
    opset: int = 17,
    int8: bool = False,
    calib_data: str | os.PathLike | None = None,
    n_patches: int = 64,
    trt: bool = False,
    fp16: bool = True,
    max_batch: int = 256,
    log=print,
) -> dict[str, Any]:
    """Export and check; return the report (also written beside the checkpoint)."""
    from mclx.checkpoint import load_checkpoint
    from mclx.export.backends import OnnxRuntimeBackend, TorchBackend
    from mclx.export.calib import calibration_patches
    from mclx.export.onnx_export import export_onnx, quantize_int8
    from mclx.export.parity import compare

    ck = load_checkpoint(checkpoint)
    onnx_out = Path(onnx_path) if onnx_path else artifact_path(checkpoint, "onnx")
    patches, source = calibration_patches(calib_data, n=n_patches, size=ck.preprocess.patch_size)
    log(f"parity patches: {len(patches)} from {source}")
    reference = TorchBackend(ck)(patches)
    report: dict[str, Any] = {
        "fingerprint": ck.fingerprint,
        "patches": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    def record(fmt: str, path: Path, precision: str, got: np.ndarray) -> dict[str, float]:
        res = compare(reference, got)
        report[fmt] = {"path": str(path), "precision": precision, **res}
        log(
            f"{fmt:<11} {precision:<5} max rel err {res['max_rel_err']:.2e}  "
            f"min cosine {res['min_cosine']:.6f}  -> {path}"
        )
        return res

    stage = _staging(onnx_out)
    try:
        export_onnx(ck, stage, opset=opset)
        _check(
            "onnx",
            onnx_out,
            record("onnx", onnx_out, "fp32", OnnxRuntimeBackend(stage)(patches)),
            "fp32",
        )
        os.replace(stage, onnx_out)
    finally:
        stage.unlink(missing_ok=True)
    from mclx.kernels import cpu_has_fast_bf16

    if cpu_has_fast_bf16():  # recorded so `--backend auto` knows torch bf16 is safe
        record("torch-bf16", Path(checkpoint), "bf16", TorchBackend(ck, precision="bf16")(patches))
    if int8:
        int8_out = onnx_out.with_name(onnx_out.name.removesuffix(".onnx") + ".int8.onnx")
        stage = _staging(int8_out)
        try:
            from mclx.export.backends import to_nchw

            quantize_int8(onnx_out, stage, to_nchw(patches, ck.preprocess))
            _check(
                "onnx-int8",
                int8_out,
                record("onnx-int8", int8_out, "int8", OnnxRuntimeBackend(stage)(patches)),
                "int8",
            )
            os.replace(stage, int8_out)
        finally:
            stage.unlink(missing_ok=True)
    write_text_atomic(report_path(checkpoint), json.dumps(report, indent=2) + "\n")
    if trt:
        from mclx.export.tensorrt_build import TensorRTBackend, build_engine, require_gpu_stack

        engine = artifact_path(checkpoint, "engine")
        require_gpu_stack(f"--trt: {engine} not built")
        stage = _staging(engine)
        try:
            build_engine(onnx_out, stage, fp16=fp16, max_batch=max_batch)
            got = TensorRTBackend(stage)(patches)
            import cupy as cp

            prec = "fp16" if fp16 else "fp32"
            _check("engine", engine, record("engine", engine, prec, cp.asnumpy(got)), prec)
            os.replace(stage, engine)
            os.replace(
                stage.with_name(stage.name + ".json"), engine.with_name(engine.name + ".json")
            )
        finally:
            stage.unlink(missing_ok=True)
            stage.with_name(stage.name + ".json").unlink(missing_ok=True)
        write_text_atomic(report_path(checkpoint), json.dumps(report, indent=2) + "\n")
    return report
