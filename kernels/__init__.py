"""Retrieval kernels: exact cosine top-k over a spot bank and weighted aggregation.

One interface over numpy arrays (CPU: torch products and compiled numba selection,
``cpu_select``), CuPy arrays (GPU, bank in device memory: cuBLAS products and CUDA
kernels, ``gpu_select`` and ``cuda/*.cu``, with the torch path as fallback) and torch
tensors; the array type of the result follows the queries. ``nvrtc`` compiles the CUDA
sources without a GPU (``make test``).

Modules by role: ``retrieval`` (the public API, and which path serves a call),
``torch_path`` (the fallback and the CuPy kernels' oracle), ``compiled_path`` (the CPU
orchestration of ``cpu_select``), ``bf16`` (the exactness bound of bfloat16 candidates),
``stages`` (stage timers), ``gpu_select`` (the CuPy kernels). Imports go one way:
``retrieval`` -> ``gpu_select`` / ``compiled_path`` -> ``torch_path`` -> ``bf16``,
``stages``.
"""

from __future__ import annotations

from mclx.kernels.retrieval import (
    aggregate,
    cpu_has_fast_bf16,
    neighbour_weights,
    retrieve,
    retrieve_reference,
    topk_cosine,
)

__all__ = [
    "cpu_has_fast_bf16",
    "aggregate",
    "neighbour_weights",
    "retrieve",
    "retrieve_reference",
    "topk_cosine",
]
