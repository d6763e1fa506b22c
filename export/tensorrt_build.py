"""TensorRT: build an engine from the exported ONNX file, and run it on CuPy buffers.

Written against the TensorRT 10 Python API (ONNX parser, explicit batch, one
optimisation profile over batch sizes, a timing cache, FP16 when the GPU has fast FP16).
The engine stays a plain engine; its metadata goes to a sidecar ``.engine.json``.
Needs an NVIDIA GPU, ``tensorrt`` and ``cupy`` (``pip install .[gpu]``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mclx.io import atomic_path, write_text_atomic


def require_gpu_stack(what: str) -> None:
    """One clear error when TensorRT, CuPy or a CUDA GPU is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        msg = f"{what}: TensorRT is not installed (pip install .[gpu] on an NVIDIA GPU machine)"
        raise RuntimeError(msg) from exc
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as exc:
        msg = f"{what}: no NVIDIA GPU usable through CuPy on this machine"
        raise RuntimeError(msg) from exc


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

    from mclx.export.onnx_export import INPUT, read_metadata

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
    side = read_metadata(onnx_path) | {
        "precision": "fp16" if use_fp16 else "fp32",
        "tensorrt_version": trt.__version__,
        "gpu": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
        "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
        "onnx": str(Path(onnx_path).resolve()),
    }
    write_text_atomic(out.with_name(out.name + ".json"), json.dumps(side, indent=2) + "\n")
    return out


def _CollectingLogger(trt):
    """A TensorRT logger that keeps errors for the one-line message instead of printing
    them on stderr."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(str(msg))

    return Logger()


def read_sidecar(engine: str | os.PathLike) -> dict:
    """The validated ``.engine.json`` of an engine: fingerprint, precision, preprocessing
    (a PreprocessCfg) and the largest batch of its profile."""
    from mclx.config import PreprocessCfg, from_dict
    from mclx.errors import FormatError

    side = Path(engine).with_name(Path(engine).name + ".json")
    if not side.is_file():
        msg = f"{side}: engine sidecar missing; rebuild with 'mclx export --trt'"
        raise FileNotFoundError(msg)
    try:
        meta = json.loads(side.read_text())
        return {
            "fingerprint": str(meta["fingerprint"]),
            "precision": str(meta.get("precision", "fp16")),
            "pre": from_dict(PreprocessCfg, json.loads(meta["preprocess"])),
            "max_batch": int(meta["profile"]["max"]),
        }
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        msg = f"{side}: not a valid engine sidecar ({exc.__class__.__name__}: {exc})"
        raise FormatError(msg) from exc


class TensorRTBackend:
    """Runs an engine on CuPy device buffers; embeddings stay on the GPU (CuPy)."""

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.is_file():
            msg = f"{path}: engine does not exist"
            raise FileNotFoundError(msg)
        require_gpu_stack(str(path))  # before importing cupy / tensorrt: one clear error
        import cupy as cp
        import tensorrt as trt

        from mclx.export.onnx_export import INPUT, OUTPUT

        meta = read_sidecar(path)
        self.fingerprint = meta["fingerprint"]
        self.precision = meta["precision"]
        self.pre = meta["pre"]
        self.max_batch = meta["max_batch"]
        self.device = "cuda"
        logger = _CollectingLogger(trt)
        runtime = trt.Runtime(logger)
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            why = f": {logger.errors[0]}" if logger.errors else ""
            msg = (
                f"{path}: cannot deserialize the engine (corrupt, or built by another "
                f"TensorRT version or GPU){why}"
            )
            raise RuntimeError(" ".join(msg.split())[:300])
        self.context = self.engine.create_execution_context()
        self.input, self.output = INPUT, OUTPUT
        self.stream = cp.cuda.Stream(non_blocking=True)

    def __call__(self, batch):
        import cupy as cp

        out = []
        for s in range(0, len(batch), self.max_batch):
            part = batch[s : s + self.max_batch]
            if isinstance(part, np.ndarray):
                from mclx.export.backends import to_nchw

                x = cp.asarray(to_nchw(part, self.pre))
            else:  # already on the device
                x = cp.ascontiguousarray(part, dtype=cp.float32)
            self.context.set_input_shape(self.input, tuple(x.shape))
            y = cp.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=cp.float32)
            self.context.set_tensor_address(self.input, x.data.ptr)
            self.context.set_tensor_address(self.output, y.data.ptr)
            with self.stream:
                self.context.execute_async_v3(self.stream.ptr)
            self.stream.synchronize()
            out.append(y)
        return cp.concatenate(out)
