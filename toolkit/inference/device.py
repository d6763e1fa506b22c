"""The one device resolver: which device ``auto`` means, which GPU ``cuda:N`` names, and
one clear error when a GPU path is asked for on a machine that cannot run it.

Asking is cheap where it can be: for an ONNX model ONNX Runtime is asked first (a CPU
build has no CUDA provider), so a CPU-only run never imports torch just to ask.

ONNX Runtime is an optional dependency (the ``cpu`` or the ``gpu`` extra, never both):
:func:`import_onnxruntime` says in one line how to install it, and
:func:`onnxruntime_distributions` finds the case where both builds were installed and the
CPU one hides the CUDA provider.
"""

from __future__ import annotations

import re
from typing import Literal

Device = str  # "cpu", "cuda" or "cuda:N"
DeviceArg = Literal["auto", "cpu", "cuda"]  # plus "cuda:N"
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"
_CUDA = re.compile(r"cuda(?::(\d+))?")
ORT_INSTALL = "pip install 'mclx[cpu]', or 'mclx[gpu]' on an NVIDIA GPU machine"


def is_cuda(device: str | None) -> bool:
    """Whether ``device`` names a GPU (``cuda`` or ``cuda:N``)."""
    return bool(device) and _CUDA.fullmatch(str(device)) is not None


def device_index(device: str) -> int:
    """The GPU ordinal of ``cuda:N`` (0 for plain ``cuda``)."""
    match = _CUDA.fullmatch(device)
    if match is None:
        msg = f"not a CUDA device: {device!r}"
        raise ValueError(msg)
    return int(match.group(1) or 0)


def torch_cuda() -> bool:
    """Whether PyTorch sees a CUDA GPU."""
    import torch

    return torch.cuda.is_available()


def import_onnxruntime(what: str = "ONNX Runtime"):
    """The ``onnxruntime`` module, or one clear error saying how to install it."""
    from mclx.extras import require

    return require("onnxruntime", message=f"{what}: ONNX Runtime is not installed ({ORT_INSTALL})")


def onnxruntime_distributions() -> list[str]:
    """Installed distributions that provide the ``onnxruntime`` package (onnxruntime,
    onnxruntime-gpu, ...). More than one: the last one pip wrote wins, file by file."""
    from importlib import metadata

    found = set()
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if not name.startswith(("onnxruntime", "ort-")):
            continue
        files = dist.files or ()
        if any(str(f).replace("\\", "/") == "onnxruntime/__init__.py" for f in files):
            found.add(name)
    return sorted(found)


def onnxruntime_cuda() -> bool:
    """Whether the installed ONNX Runtime has its CUDA execution provider."""
    from mclx.extras import installed

    if not installed("onnxruntime"):
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_device(device: str = "auto", *, onnx: bool = False) -> Device:
    """``auto`` -> ``cuda`` when a GPU can run the model, else ``cpu``.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. An explicit GPU is returned as
            is: the encoder that opens on it says, in one line, what is missing.
        onnx: the model is an ONNX file (ONNX Runtime decides, not PyTorch).
    """
    if device == "cpu" or is_cuda(device):
        return device
    if device != "auto":
        msg = f"unknown device {device!r} ({DEVICE_CHOICES})"
        raise ValueError(msg)
    if onnx and not onnxruntime_cuda():
        return "cpu"
    return "cuda" if torch_cuda() else "cpu"


def torch_device(device: str | None = None):
    """A ``torch.device`` for ``device`` (default ``auto``), refusing a GPU that PyTorch
    does not see."""
    import torch

    dev = resolve_device(device or "auto")
    if is_cuda(dev):
        if not torch_cuda():
            msg = f"--device {dev}: no CUDA GPU is visible to PyTorch on this machine"
            raise RuntimeError(msg)
        count = torch.cuda.device_count()
        if device_index(dev) >= count:
            msg = f"--device {dev}: PyTorch sees {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})"
            raise RuntimeError(msg)
    return torch.device(dev)


def require_gpu_stack(what: str) -> None:
    """One clear error when TensorRT, CuPy or a CUDA GPU is missing."""
    from mclx.extras import require

    msg = f"{what}: TensorRT is not installed (pip install 'mclx[gpu]' on an NVIDIA GPU box)"
    require("tensorrt", message=msg)
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as exc:
        msg = f"{what}: no NVIDIA GPU usable through CuPy on this machine"
        raise RuntimeError(msg) from exc
