"""The one device resolver: which device ``auto`` means, and one clear error when a GPU
path is asked for on a machine that cannot run it.

Asking is cheap where it can be: for an ONNX model ONNX Runtime is asked first (a CPU
build has no CUDA provider), so a CPU-only run never imports torch just to ask.
"""

from __future__ import annotations

from typing import Literal

Device = Literal["cpu", "cuda"]
DeviceArg = Literal["auto", "cpu", "cuda"]


def torch_cuda() -> bool:
    """Whether PyTorch sees a CUDA GPU."""
    import torch

    return torch.cuda.is_available()


def onnxruntime_cuda() -> bool:
    """Whether the installed ONNX Runtime has its CUDA execution provider."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_device(device: str = "auto", *, onnx: bool = False) -> Device:
    """``auto`` -> ``cuda`` when a GPU can run the model, else ``cpu``.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``. An explicit ``cuda`` is returned as is: the
            encoder that opens on it says, in one line, what is missing.
        onnx: the model is an ONNX file (ONNX Runtime decides, not PyTorch).
    """
    if device in ("cpu", "cuda"):
        return device  # type: ignore[return-value]
    if device != "auto":
        msg = f"unknown device {device!r} (auto, cpu, cuda)"
        raise ValueError(msg)
    if onnx and not onnxruntime_cuda():
        return "cpu"
    return "cuda" if torch_cuda() else "cpu"


def torch_device(device: str | None = None):
    """A ``torch.device`` for ``device`` (default ``auto``), refusing CUDA without a GPU."""
    import torch

    dev = resolve_device(device or "auto")
    if dev == "cuda" and not torch_cuda():
        msg = "--device cuda: no CUDA GPU is visible to PyTorch on this machine"
        raise RuntimeError(msg)
    return torch.device(dev)


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
