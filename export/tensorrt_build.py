"""TensorRT: build an engine from an ONNX encoder (run by
:class:`mclx.inference.tensorrt.TensorRTEncoder`).

One code path for the TensorRT 10 and 11 Python APIs: TensorRT 11 removed the FP16 builder
flag and ``Builder.platform_has_fast_fp16`` and always builds strongly typed networks, so
the precision comes from the graph's types on both. An FP16 engine is built from an FP16
ONNX graph with float32 input and output (:func:`mclx.export.onnx_export.export_onnx`
with ``precision="fp16"``); an FP32 engine from the FP32 graph with TF32 cleared (enabled
by default in both versions, it rounds float32 products to 10-bit mantissas and misses
the 1e-4 parity bound). One optimisation profile over batch sizes (``opt`` clamped to
``max``), a timing cache. The engine stays a plain engine; its metadata goes to a sidecar
``.engine.json`` bound to the engine's bytes by their sha256. Needs an NVIDIA GPU,
``tensorrt`` and ``cupy`` (``pip install 'mclx[gpu]'``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import NoReturn

from mclx.files import all_or_nothing, atomic_path, write_text_atomic
from mclx.inference.device import require_gpu_stack
from mclx.inference.encoders import INPUT, OUTPUT, read_onnx_metadata
from mclx.inference.tensorrt import sidecar_path

DEFAULT_MAX_BATCH = 256
OPT_BATCH = 64


def build(job, out: Path) -> str:
    """Formats-table builder of ``engine``: FP16 (from an FP16 graph of the job's
    checkpoint) unless ``fp16=False`` (from the job's FP32 ONNX file); returns the
    precision built."""
    from mclx.export.onnx_export import compute_types, export_onnx, graph_precision

    engine = job.paths["engine"]
    fp32_graph = job.paths["onnx"]
    precision = "fp16" if job.options.get("fp16", True) else "fp32"
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        graph = fp32_graph
        if precision == "fp16":
            opset = job.options.get("opset") or 17
            graph = export_onnx(job.ck, Path(tmp) / "fp16.onnx", opset=opset, precision="fp16")
            if graph_precision(graph) != "fp16":  # TensorRT would build it in float32
                types = compute_types(graph)
                msg = f"{engine}: the FP16 graph computes in float32 (Conv/MatMul/Gemm: {types})"
                raise RuntimeError(msg)
        build_engine(
            graph,
            out,
            max_batch=job.options.get("max_batch") or DEFAULT_MAX_BATCH,
            timing_cache=engine.with_name(engine.name + ".timing.cache"),
            source=fp32_graph,
        )
    return precision


def profile_batches(min_batch: int, opt_batch: int, max_batch: int) -> tuple[int, int, int]:
    """``(min, opt, max)`` of the batch profile, ``opt`` clamped into ``[min, max]``."""
    if not 1 <= min_batch <= max_batch:
        msg = f"TensorRT profile: need 1 <= min batch ({min_batch}) <= max batch ({max_batch})"
        raise ValueError(msg)
    return min_batch, min(max(opt_batch, min_batch), max_batch), max_batch


def strongly_typed(trt) -> int:
    """``create_network`` flags of a strongly typed network (TensorRT 10; the flag is
    kept, and ignored, by TensorRT 11 where every network is strongly typed)."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_engine(
    onnx_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    min_batch: int = 1,
    opt_batch: int = OPT_BATCH,
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_gib: float = 4.0,
    timing_cache: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
) -> Path:
    """Build ``out`` (.engine) and its ``.engine.json`` sidecar from an ONNX encoder.

    The engine's precision is the graph's (:func:`~mclx.export.onnx_export.graph_precision`:
    the type its Conv / MatMul / Gemm nodes compute in). ``source``: the ONNX file whose
    mclx metadata the sidecar carries (default ``onnx_path``). The timing cache (default
    ``out`` + ``.timing.cache``) speeds up later builds. Engine, sidecar and cache are
    written together or not at all: every TensorRT result is checked first.
    """
    out = Path(out)
    require_gpu_stack(str(out))  # one line before tensorrt is imported
    import tensorrt as trt

    from mclx.export.onnx_export import graph_precision
    from mclx.inference.tensorrt import collecting_logger

    batches = profile_batches(min_batch, opt_batch, max_batch)
    precision = graph_precision(onnx_path)
    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed(trt))
    _parse(trt, network, onnx_path, logger)
    cache_path = Path(timing_cache) if timing_cache else out.with_name(out.name + ".timing.cache")
    config = _config(trt, builder, network, batches, workspace_gib, cache_path, out, logger)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        _failed(out, "engine build", logger)
    data = bytes(serialized)
    cache = config.get_timing_cache()
    if cache is None:
        _failed(out, "get_timing_cache (after the build)", logger)
    cache_bytes = bytes(cache.serialize())
    side = _sidecar(data, Path(source or onnx_path), precision, batches, trt.__version__)
    with all_or_nothing():
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
        write_text_atomic(sidecar_path(out), side)
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(cache_bytes)
    return out


def _failed(out: Path, what: str, logger) -> NoReturn:
    """TensorRT reports failure as None, False or -1 (and a log line): one line."""
    why = f": {logger.errors[-1]}" if logger.errors else ""
    msg = f"{out}: TensorRT {what} failed{why}"
    raise RuntimeError(" ".join(msg.split())[:300])


def _config(trt, builder, network, batches, workspace_gib, cache_path: Path, out, logger):
    """The builder config: workspace, TF32 cleared, the batch profile, the timing cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    config.clear_flag(trt.BuilderFlag.TF32)  # float32 layers stay float32
    shape = tuple(network.get_input(0).shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, *((b, *shape) for b in batches))
    if config.add_optimization_profile(profile) < 0:  # -1: the profile is invalid
        _failed(out, f"add_optimization_profile {batches}", logger)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        _failed(out, f"timing cache {cache_path.name}", logger)
    return config


def _sidecar(data: bytes, source: Path, precision, batches, version) -> str:
    """The ``.engine.json`` text: the ONNX file's mclx metadata, how the engine was built,
    and the sha256 of its bytes (an engine is only run with the sidecar of its own build)."""
    side = read_onnx_metadata(source) | {
        "precision": precision,
        "tensorrt_version": version,
        "gpu": gpu_name(),
        "profile": dict(zip(("min", "opt", "max"), batches)),
        "onnx": str(source.resolve()),
        "engine_sha256": hashlib.sha256(data).hexdigest(),
    }
    return json.dumps(side, indent=2) + "\n"


def _parse(trt, network, onnx_path, logger) -> None:
    """Parse the ONNX file into ``network``; its input and output must be float32 (the
    encoder's interface whatever the precision inside)."""
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        msg = f"{onnx_path}: TensorRT cannot parse the ONNX file ({errors})"
        raise RuntimeError(msg)
    ends = [network.get_input(0), network.get_output(0)]
    if [t.name for t in ends] != [INPUT, OUTPUT] or any(t.dtype != trt.float32 for t in ends):
        got = ", ".join(f"{t.name} {t.dtype}" for t in ends)
        msg = f"{onnx_path}: not an mclx encoder graph (need float32 {INPUT} -> {OUTPUT}; {got})"
        raise RuntimeError(msg)


def gpu_name() -> str:
    """The name of the current CUDA device (for the sidecar)."""
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)
