"""Device memory of the GPU retrieval path (:mod:`mclx.kernels.gpu_select`).

The bank stays resident; the score tile and a key chunk are fixed in size; what grows
with the number of queries Q is each query's scratch, ~16 KiB (the CAP-entry running
top-m buffers of ``select_topm``), so one call with a million queries would ask ~16 GiB.
Queries therefore go in blocks whose scratch stays within :data:`SCRATCH_FRACTION` of
the GPU's free memory at the time of the call.

Sizes that fit (docs/gpu.md): a bank costs 4·(D + G) bytes a spot on the GPU (keys and
expressions, float32): 4,164 bytes at D = 256 and G = 785. On an 80 GB GPU (H100: 79.6
GiB) a bank of 17 million spots (70.8 GB) leaves ~8 GB for the CUDA context (~0.5 GB),
the encoder (a DenseNet-121 engine at batch 256: ~2 GB) and the retrieval (score tile
256 MiB, key chunk 64 MiB, query blocks within 25 % of what is then free: ~1 GB, some
60,000 queries a block). Keys alone (``topk_cosine``: 1,024 bytes a spot): ~70 million.
"""

from __future__ import annotations

CAP = 2048  # running top-m buffer per query (retrieval.cu's CAP)
SCRATCH_FRACTION = 0.25


def query_scratch_bytes(m: int, k: int, width: int) -> int:
    """Device bytes one query needs while it is selected and re-scored: the running
    top-m buffers (scores and indices, CAP each), count and threshold, its unit copy
    and the (Q, m) candidates, re-scored cosines and distances, and the (Q, k) results."""
    return 2 * CAP * 4 + 8 + 2 * width * 4 + 4 * m * 4 + 3 * k * 4


def free_device_bytes(cp) -> int:
    """Free memory of the current GPU, counting what CuPy's pool holds unused."""
    free = int(cp.cuda.Device().mem_info[0])
    pool = getattr(cp, "get_default_memory_pool", None)
    return free + (int(pool().free_bytes()) if pool is not None else 0)


def queries_per_block(
    cp, rows: int, m: int, k: int, width: int, *, fixed: int = 0, limit: int | None = None
) -> int:
    """Queries per block so that their scratch (:func:`query_scratch_bytes`) and the
    ``fixed`` buffers stay within :data:`SCRATCH_FRACTION` of the free GPU memory (at
    least one query, at most ``limit`` or all of them)."""
    budget = int(SCRATCH_FRACTION * free_device_bytes(cp)) - fixed
    fits = max(1, budget // query_scratch_bytes(m, k, width))
    return max(1, min(rows, fits, limit or rows))
