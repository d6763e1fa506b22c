"""TensorRT engines at inference: the sidecar that describes an engine, and the encoder
that runs one on CuPy device buffers (embeddings stay on the GPU).

What the engine itself knows is read from the engine: the batch profile and the tensor
types. The sidecar adds what it cannot know (the checkpoint's fingerprint, the pixel
preprocessing) and must carry the sha256 of the engine's bytes: an engine and a sidecar
from different builds (an interrupted export renames them one after the other) are
refused, not run.

Needs an NVIDIA GPU, ``tensorrt`` and ``cupy`` (``pip install 'mclx[gpu]'``); engines are
built by :mod:`mclx.export.tensorrt_build`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from mclx.inference.device import device_index, is_cuda, require_gpu_stack
from mclx.inference.encoders import INPUT, OUTPUT
from mclx.inference.transform import to_model_input


def collecting_logger(trt):
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


def sidecar_path(engine: str | os.PathLike) -> Path:
    return Path(engine).with_name(Path(engine).name + ".json")


def read_sidecar(engine: str | os.PathLike, data: bytes | None = None) -> dict:
    """The validated ``.engine.json`` of an engine: fingerprint, precision, preprocessing
    (a PreprocessCfg); with ``data`` (the engine's bytes) it must describe those bytes."""
    from mclx.config import PreprocessCfg, from_dict
    from mclx.errors import FormatError

    side = sidecar_path(engine)
    if not side.is_file():
        msg = f"{side}: engine sidecar missing; rebuild with 'mclx export --trt'"
        raise FileNotFoundError(msg)
    try:
        meta = json.loads(side.read_text())
        out = {
            "fingerprint": str(meta["fingerprint"]),
            "precision": str(meta["precision"]),
            "pre": from_dict(PreprocessCfg, json.loads(meta["preprocess"])),
            "sha256": str(meta["engine_sha256"]),
        }
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        msg = (
            f"{side}: not a valid engine sidecar ({exc.__class__.__name__}: {exc}); "
            f"rebuild the engine with 'mclx export --trt'"
        )
        raise FormatError(msg) from exc
    if data is not None and hashlib.sha256(data).hexdigest() != out["sha256"]:
        msg = (
            f"{side}: describes another engine than {Path(engine).name} (sha256 differs: "
            f"the two come from different builds); rebuild with 'mclx export --trt'"
        )
        raise FormatError(msg)
    return out


class TensorRTEncoder:
    """Runs an engine on CuPy device buffers; embeddings stay on the GPU (CuPy).

    Every copy, allocation and launch is queued on the encoder's own stream; a batch
    already on the GPU is first waited for on the caller's stream, and the result is
    complete when the call returns. Batches larger than the engine's profile are split.
    """

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, *, device: str = "cuda") -> None:
        path = Path(path)
        if not path.is_file():
            msg = f"{path}: engine does not exist"
            raise FileNotFoundError(msg)
        require_gpu_stack(str(path))  # before importing cupy / tensorrt: one clear error
        import cupy as cp
        import tensorrt as trt

        data = path.read_bytes()
        meta = read_sidecar(path, data)
        self.path, self.fingerprint, self.pre = path, meta["fingerprint"], meta["pre"]
        self.precision = meta["precision"]
        self.device = device if is_cuda(device) else "cuda"
        self.gpu = cp.cuda.Device(device_index(self.device))
        self.logger = collecting_logger(trt)
        with self.gpu:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(data)
            if self.engine is None:
                why = f": {self.logger.errors[0]}" if self.logger.errors else ""
                msg = (
                    f"{path}: cannot deserialize the engine (corrupt, or built by another "
                    f"TensorRT version or GPU){why}"
                )
                raise RuntimeError(" ".join(msg.split())[:300])
            self._read_engine(trt)
            self.context = self.engine.create_execution_context()
            if self.context is None:  # e.g. out of device memory for its activations
                why = f": {self.logger.errors[-1]}" if self.logger.errors else ""
                msg = f"{path}: TensorRT cannot create an execution context{why}"
                raise RuntimeError(" ".join(msg.split())[:300])
            self.stream = cp.cuda.Stream(non_blocking=True)

    def _read_engine(self, trt) -> None:
        """Batch range and tensor types from the engine itself."""
        lo, _, hi = self.engine.get_tensor_profile_shape(INPUT, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(INPUT)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(OUTPUT)))
        self.out_dim = int(self.engine.get_tensor_shape(OUTPUT)[-1])

    def _check(self, ok, what: str) -> None:
        """TensorRT reports failure as False (and a log line): never read the output."""
        if not ok:
            why = f": {self.logger.errors[-1]}" if self.logger.errors else ""
            msg = f"{self.path}: TensorRT {what} failed{why}"
            raise RuntimeError(" ".join(msg.split())[:300])

    def _run(self, part, keep: list):
        """Queue one batch (at most ``max_batch``) on the engine's stream."""
        import cupy as cp

        if isinstance(part, np.ndarray):
            x = cp.asarray(to_model_input(part, self.pre), dtype=self.in_dtype)
        else:  # already on the device
            x = cp.ascontiguousarray(part, dtype=self.in_dtype)
        shape = tuple(x.shape)
        self._check(self.context.set_input_shape(INPUT, shape), f"set_input_shape {shape}")
        y = cp.empty(tuple(self.context.get_tensor_shape(OUTPUT)), dtype=self.out_dtype)
        for name, array in ((INPUT, x), (OUTPUT, y)):
            self._check(self.context.set_tensor_address(name, array.data.ptr), f"{name} address")
        self._check(self.context.execute_async_v3(self.stream.ptr), f"run of a batch of {len(x)}")
        keep.append(x)  # alive until the stream has run
        return y if y.dtype == np.float32 else y.astype(cp.float32)

    def __call__(self, batch):
        import cupy as cp

        keep: list = []
        if not len(batch):
            with self.gpu:
                return cp.empty((0, self.out_dim), dtype=cp.float32)
        with self.gpu:
            caller = cp.cuda.get_current_stream()
            with self.stream:
                if not isinstance(batch, np.ndarray):  # produced on the caller's stream
                    self.stream.wait_event(caller.record())
                step = self.max_batch
                out = [self._run(batch[s : s + step], keep) for s in range(0, len(batch), step)]
                result = cp.concatenate(out) if len(out) != 1 else out[0]
            self.stream.synchronize()
        return result
