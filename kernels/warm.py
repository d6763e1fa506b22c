"""Compile the CPU retrieval kernels ahead of the first retrieval.

numba compiles each kernel of :mod:`mclx.kernels.cpu_select` at its first call (9 s for
all of them on 2 cores in a fresh clone) and caches the machine code (``cache=True``:
beside the module, or in numba's user cache folder when the install is read-only, or in
``$NUMBA_CACHE_DIR``). ``make install`` runs ``python -m mclx.kernels.warm`` once, so
later processes load the cached code instead (a fraction of a second); the runtime calls
:func:`warm_up` before its first retrieval and reports that time as ``compile``, apart
from ``retrieve``. Every precision, distance and weighting is exercised once: which one a
run takes depends on its bank (``precision="auto"``).
"""

from __future__ import annotations

import sys
import time

import numpy as np

_done = False


def warm_up() -> float:
    """Compile (or load from the cache) every CPU kernel once per process; the seconds it
    took (0 once done in this process, and when numba is absent)."""
    global _done
    from mclx.kernels.retrieval import compiled_available, retrieve

    if _done or not compiled_available():
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((600, 8)).astype(np.float32)  # > k + 256: bf16 drops keys
    values = rng.random((600, 3)).astype(np.float32)
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    for precision in ("fp32", "bf16"):
        for distance in ("l1", "l2"):
            for weighting in ("inverse_square", "mean"):
                retrieve(queries, keys, values, 5, distance=distance, weighting=weighting,
                         precision=precision)  # fmt: skip
    _done = True
    return time.perf_counter() - t0


def main() -> None:
    seconds = warm_up()
    print(f"mclx.kernels: CPU retrieval kernels ready ({seconds:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
