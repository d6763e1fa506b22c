"""Retrieval kernels: exact cosine top-k over a spot bank and weighted aggregation.

One interface over numpy arrays (CPU: torch products and compiled numba selection,
``cpu_select``), CuPy arrays (GPU, bank in device memory: cuBLAS products and CUDA
kernels, ``gpu_select`` and ``cuda/*.cu``, with the torch path as fallback) and torch
tensors; the array type of the result follows the queries. ``nvrtc`` compiles the CUDA
sources without a GPU (``make test``).
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
