"""Retrieval kernels: exact cosine top-k over a spot bank and weighted aggregation.

The same code serves numpy arrays (CPU) and CuPy arrays (GPU, bank in device memory):
the array module follows the inputs.
"""

from __future__ import annotations

from mclx.kernels.retrieval import (
    aggregate,
    neighbour_weights,
    retrieve,
    retrieve_reference,
    topk_cosine,
)

__all__ = ["aggregate", "neighbour_weights", "retrieve", "retrieve_reference", "topk_cosine"]
