"""TensorRT: build an engine from the exported ONNX file (run by
:class:`mclx.inference.tensorrt.TensorRTEncoder`).

Written against the TensorRT 10 Python API (ONNX parser, explicit batch, one
optimisation profile over batch sizes, a timing cache, FP16 when the GPU has fast FP16).
The engine stays a plain engine; its metadata goes to a sidecar ``.engine.json``.
Needs an NVIDIA GPU, ``tensorrt`` and ``cupy`` (``pip install .[gpu]``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mclx.inference.device import require_gpu_stack
from mclx.inference.encoders import INPUT, read_onnx_metadata
from mclx.io import atomic_path, write_text_atomic


def build(job, out: Path) -> str:
    """Formats-table builder of ``engine``: from the job's FP32 ONNX file, FP16 unless
    ``fp16=False`` (or the GPU has no fast FP16); returns the precision built."""
    engine = job.paths["engine"]
    build_engine(
        job.paths["onnx"],
        out,
        fp16=job.options.get("fp16", True),
        max_batch=job.options.get("max_batch") or 256,
        timing_cache=engine.with_name(engine.name + ".timing.cache"),
    )
    return json.loads(out.with_name(out.name + ".json").read_text())["precision"]


def build_engine(
    onnx_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fp16: bool = True,
    min_batch: int = 1,
    opt_batch: int = 64,
    max_batch: int = 256,
    workspace_gib: float = 4.0,
    timing_cache: str | os.PathLike | None = None,
) -> Path:
    """Build ``out`` (.engine) and its ``.engine.json`` sidecar from an ONNX encoder.

    The timing cache (default ``out`` + ``.timing.cache``) speeds up later builds.
    """
    import tensorrt as trt

    out = Path(out)
    require_gpu_stack(str(out))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        msg = f"{onnx_path}: TensorRT cannot parse the ONNX file ({errors})"
        raise RuntimeError(msg)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    use_fp16 = fp16 and builder.platform_has_fast_fp16
    if use_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    shape = tuple(network.get_input(0).shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, (min_batch, *shape), (opt_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else out.with_name(out.name + ".timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        msg = f"{out}: TensorRT engine build failed"
        raise RuntimeError(msg)
    with atomic_path(out) as tmp:
        tmp.write_bytes(bytes(serialized))
    with atomic_path(cache_path) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    side = read_onnx_metadata(onnx_path) | {
        "precision": "fp16" if use_fp16 else "fp32",
        "tensorrt_version": trt.__version__,
        "gpu": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
        "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
        "onnx": str(Path(onnx_path).resolve()),
    }
    write_text_atomic(out.with_name(out.name + ".json"), json.dumps(side, indent=2) + "\n")
    return out
