"""The TensorRT checks of ``python -m mclx.gpu_check``: FP16 engines (``mclx export --trt
--max-batch 32`` and one at the default max batch 256) and an FP32 engine (TF32 cleared)
against PyTorch FP32 at the profile's edges, from host and device memory with the null
stream busy; an engine of another checkpoint and a sidecar of another build refused.
Skipped, with the reason, where ``tensorrt`` is not installed (a bare CUDA machine)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from mclx.gpu_check.workspace import MAX_REL_FP32, MIN_COS, Workspace, batches, compare


def _busy_null_stream():
    """Queue ~20 ms of work on the legacy null stream: copies that wrongly go there
    would wait behind it, or race with the engine."""
    import cupy as cp

    with cp.cuda.Stream.null:
        a = cp.ones((4096, 4096), cp.float32)
        for _ in range(8):
            a = (a @ a) * np.float32(1e-4)
    return a


def engine_parity(ws: Workspace, engine: Path, max_batch: int, fp32: bool) -> tuple[dict, list]:
    """The engine against PyTorch FP32 (CPU) at :func:`batches`, from host and from
    device (made on the null stream), with the null stream busy."""
    import cupy as cp

    from mclx.inference.tensorrt import TensorRTEncoder
    from mclx.inference.transform import to_model_input

    enc = TensorRTEncoder(engine)
    details, problems = {"profile": [enc.min_batch, enc.max_batch], "precision": enc.precision}, []
    for n in batches(max_batch):
        x, ref = ws.patches(n), ws.reference(n)
        for where in ("host", "device"):
            batch = x if where == "host" else cp.asarray(to_model_input(x, enc.pre))
            _busy_null_stream()
            res = compare(ref, enc(batch).get())
            details[f"batch_{n}_{where}"] = res
            if fp32 and res["max_rel_err"] > MAX_REL_FP32:
                problems.append(f"batch {n} ({where}): max relative error {res['max_rel_err']:.2e}")
            if res["min_cosine"] < MIN_COS:
                problems.append(f"batch {n} ({where}): min cosine {res['min_cosine']:.4f}")
    return details, problems


def tensorrt_fp16(ws: Workspace):
    """``mclx export --trt --max-batch 32`` and an engine at the default 256: FP16."""
    from mclx.export.exporter import export

    t0 = time.perf_counter()
    rep = export(ws.checkpoint(), trt=True, max_batch=32, calib_data=ws.data(), log=lambda *_: None)
    details = {"export_max_batch_32": rep["engine"], "export_seconds": time.perf_counter() - t0}
    problems = [] if rep["engine"]["precision"] == "fp16" else ["export built no FP16 engine"]
    engine = ws.checkpoint().with_suffix(".engine")
    details["max_batch_32"], more = engine_parity(ws, engine, 32, fp32=False)
    problems += [f"max batch 32, {p}" for p in more]
    t0 = time.perf_counter()
    default = ws.engine("default.engine", 256)
    details["default_build_seconds"] = time.perf_counter() - t0
    details["max_batch_256"], more = engine_parity(ws, default, 256, fp32=False)
    problems += [f"max batch 256, {p}" for p in more]
    for name in ("max_batch_32", "max_batch_256"):  # the graph's compute type, not a label
        if details[name]["precision"] != "fp16":
            problems.append(f"{name}: an {details[name]['precision']} engine, not FP16")
    return details, problems


def tensorrt_fp32(ws: Workspace):
    """An FP32 engine (TF32 cleared) within 1e-4 of PyTorch."""
    engine = ws.engine("fp32.engine", 32, precision="fp32")
    return engine_parity(ws, engine, 32, fp32=True)


def tensorrt_refusals(ws: Workspace):
    """An engine of another checkpoint, and a sidecar of another build, are refused."""
    from mclx.errors import FingerprintMismatch, FormatError
    from mclx.inference import open_encoder
    from mclx.inference.tensorrt import TensorRTEncoder, sidecar_path

    engine = ws.engine("fp32.engine", 32, precision="fp32")
    other = ws.checkpoint("other.pt", seed=1)
    shutil.copy(engine, other.with_suffix(".engine"))
    shutil.copy(sidecar_path(engine), sidecar_path(other.with_suffix(".engine")))
    details, problems = {}, []
    try:
        open_encoder(other, backend="tensorrt", device="cuda")
        problems.append("an engine of another checkpoint was opened")
    except FingerprintMismatch as exc:
        details["other_checkpoint"] = str(exc)
    mixed = ws.root / "mixed.engine"
    shutil.copy(ws.engine("default.engine", 256), mixed)
    shutil.copy(sidecar_path(engine), sidecar_path(mixed))
    try:
        TensorRTEncoder(mixed)
        problems.append("an engine with the sidecar of another build was opened")
    except FormatError as exc:
        details["other_build"] = str(exc)
    return details, problems
