"""The one pixel transform: uint8 patches -> the model's input, for every backend.

Slide readers and patch cutters give uint8 N x H x W x 3; every encoder (PyTorch in
training and inference, ONNX Runtime, TensorRT) takes float32 N x 3 x H x W in the
checkpoint's pixel scale: ``x / 255``, then ``(x - mean) / std`` when the
:class:`~mclx.config.PreprocessCfg` asks for it (the reference code does not). A
``--context-fov`` model's patches hold two views side by side on the channel axis
(N x H x W x 6: the patch, then its wider field of view), each scaled the same way.
The result has the input's array type (numpy, CuPy or torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mclx.config import PreprocessCfg


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _normalised(pre: PreprocessCfg) -> bool:
    return any(pre.mean) or any(s != 1 for s in pre.std)


def _per_channel(pre: PreprocessCfg, channels: int) -> tuple[list[float], list[float]]:
    """The RGB mean and std repeated for each 3-channel view of a batch."""
    views = max(1, channels // 3)
    return list(pre.mean) * views, list(pre.std) * views


def to_model_input(batch: Any, pre: PreprocessCfg) -> Any:
    """uint8 NHWC -> float32 NCHW in the model's pixel scale; float NCHW passes through.

    Args:
        batch: numpy, CuPy or torch array; uint8 N x H x W x 3V, or float N x 3V x H x W
            already scaled (it is only made float32 and contiguous); V views of a patch.
        pre: the checkpoint's preprocessing (mean / std).
    """
    if _is_torch(batch):
        import torch

        x = batch.permute(0, 3, 1, 2).float() / 255.0 if batch.dtype == torch.uint8 else batch
        x = x.float()
        if _normalised(pre):
            mean, std = _per_channel(pre, x.shape[1])
            mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x
    xp = _array_module(batch)
    if batch.dtype == np.uint8:
        x = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
        if _normalised(pre):
            mean, std = _per_channel(pre, x.shape[1])
            mean = xp.asarray(mean, np.float32)[None, :, None, None]
            std = xp.asarray(std, np.float32)[None, :, None, None]
            x = (x - mean) / std
        return xp.ascontiguousarray(x)
    return xp.ascontiguousarray(batch, dtype=np.float32)


def to_tensor(batch: Any, pre: PreprocessCfg, device: Any):
    """:func:`to_model_input` as a channels-last torch tensor on ``device`` (PyTorch's
    fastest layout for convolutions on CPU and GPU)."""
    import torch

    x = torch.as_tensor(batch).to(device)
    return to_model_input(x, pre).contiguous(memory_format=torch.channels_last)


def _array_module(x: Any):
    """numpy, or CuPy for a CuPy array (imported only when the input is one)."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np
