"""TensorRT engines at inference: the sidecar that describes an engine, and the encoder
that runs one on CuPy device buffers (embeddings stay on the GPU).

Needs an NVIDIA GPU, ``tensorrt`` and ``cupy`` (``pip install .[gpu]``); engines are
built by :mod:`mclx.export.tensorrt_build`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mclx.inference.device import require_gpu_stack
from mclx.inference.encoders import INPUT, OUTPUT
from mclx.inference.transform import to_model_input


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


class TensorRTEncoder:
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
                x = cp.asarray(to_model_input(part, self.pre))
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
