"""The array types the retrieval kernels take, as scanpy's ``ARRAY_TYPES``.

Each entry of :data:`ARRAY_TYPES` is a ``pytest.param`` of a constructor that turns a
numpy array into that type: numpy itself, a CPU torch tensor (``mclx.kernels`` passes
tensors through and returns tensors), and a CuPy array on the GPU (marked
``needs("cupy")``: skipped, with the reason, where there is none). Parametrise a test
with ``@pytest.mark.parametrize("array_type", ARRAY_TYPES)`` and bring results back to
numpy with :func:`as_numpy`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from helpers.marks import needs


def numpy_array(x: Any) -> np.ndarray:
    return np.array(x)


def torch_cpu(x: Any):
    import torch

    return torch.from_numpy(np.array(x))


def cupy_array(x: Any):
    import cupy

    return cupy.asarray(np.asarray(x))


ARRAY_TYPES = (
    pytest.param(numpy_array, id="numpy"),
    pytest.param(torch_cpu, id="torch-cpu"),
    pytest.param(cupy_array, id="cupy", marks=needs("cupy")),
)


def as_numpy(x: Any) -> np.ndarray:
    """A numpy copy of a numpy, torch (any device) or CuPy array."""
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)


def same_type(result: Any, array_type) -> bool:
    """Whether ``result`` has the array type ``array_type`` makes."""
    return type(result) is type(array_type(np.zeros((1, 1), np.float32)))
