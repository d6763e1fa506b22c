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
from mclx.io import check_output, write_text_atomic


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
    outputs = [onnx_out, report_path(checkpoint)]
    if trt:
        from mclx.export.tensorrt_build import require_gpu_stack

        outputs.append(artifact_path(checkpoint, "engine"))
        require_gpu_stack(f"--trt: {outputs[-1]} not built")  # before writing anything
    for out in outputs:
        check_output(out)
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

    def publish(fmt: str, final: Path, precision: str, build, run, sidecars=()) -> None:
        """Build under a staging name, check parity, then rename (with sidecars)."""
        stage = _staging(final)
        extra = [
            (stage.with_name(stage.name + x), final.with_name(final.name + x)) for x in sidecars
        ]
        try:
            try:
                build(stage)
            except OSError as exc:  # name the artifact, not its staging file
                if str(stage) not in str(exc):
                    raise
                err = OSError(str(exc).replace(str(stage), str(final)))
                err.errno = exc.errno
                raise err from exc
            _check(fmt, final, record(fmt, final, precision, run(stage)), precision)
            os.replace(stage, final)
            for src, dst in extra:
                os.replace(src, dst)
        finally:
            stage.unlink(missing_ok=True)
            for src, _ in extra:
                src.unlink(missing_ok=True)

    def on_ort(path: Path) -> np.ndarray:
        return OnnxRuntimeBackend(path)(patches)

    publish("onnx", onnx_out, "fp32", lambda p: export_onnx(ck, p, opset=opset), on_ort)
    from mclx.kernels import cpu_has_fast_bf16

    if cpu_has_fast_bf16():  # recorded so `--backend auto` knows torch bf16 is safe
        record("torch-bf16", Path(checkpoint), "bf16", TorchBackend(ck, precision="bf16")(patches))
    if int8:
        from mclx.export.backends import to_nchw

        int8_out = onnx_out.with_name(onnx_out.name.removesuffix(".onnx") + ".int8.onnx")
        calib = to_nchw(patches, ck.preprocess)
        publish("onnx-int8", int8_out, "int8", lambda p: quantize_int8(onnx_out, p, calib), on_ort)
    write_text_atomic(report_path(checkpoint), json.dumps(report, indent=2) + "\n")
    if trt:
        from mclx.export.tensorrt_build import TensorRTBackend, build_engine

        engine = artifact_path(checkpoint, "engine")

        def on_trt(path: Path) -> np.ndarray:
            import cupy as cp

            return cp.asnumpy(TensorRTBackend(path)(patches))

        publish(
            "engine",
            engine,
            "fp16" if fp16 else "fp32",
            lambda p: build_engine(
                onnx_out,
                p,
                fp16=fp16,
                max_batch=max_batch,
                timing_cache=engine.with_name(engine.name + ".timing.cache"),
            ),
            on_trt,
            sidecars=(".json",),
        )
        write_text_atomic(report_path(checkpoint), json.dumps(report, indent=2) + "\n")
    return report
