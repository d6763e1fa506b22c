"""Retrieval kernels: exact cosine top-k over a spot bank and weighted aggregation.

One torch implementation serves numpy arrays (CPU) and CuPy arrays (GPU, bank in device
memory, zero-copy through DLPack): the array type of the result follows the inputs.
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
