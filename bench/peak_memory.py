"""Peak resident memory of one retrieval call, measured in a fresh process.

    python bench/peak_memory.py IMPL N  ->  prints JSON with bank size and peak RSS

The bank is generated and touched first; then the kernel's high-water mark is reset
(/proc/self/clear_refs) so the peak reported is bank + whatever the call adds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from banks import random_bank, random_queries  # noqa: E402
from retrieval_impls import faiss_exact, reference_loop  # noqa: E402


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(impl: str, n: int, k: int = 200) -> None:
    from mclx.kernels import retrieve

    fns = {
        "kernel": lambda q, kk, v: retrieve(q, kk, v, k),
        "kernel_fp32": lambda q, kk, v: retrieve(q, kk, v, k, precision="fp32"),
        "faiss": lambda q, kk, v: faiss_exact(q, kk, v, k),
        "reference": lambda q, kk, v: reference_loop(q, kk, v, k),
    }
    keys, values = random_bank(n)
    queries = random_queries()
    fns[impl](queries[:8], keys, values)  # warm up libraries and thread pools
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    fns[impl](queries, keys, values)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    print(
        json.dumps(
            {
                "impl": impl,
                "n": n,
                "seconds": seconds,
                "bank_gib": (keys.nbytes + values.nbytes) / 2**30,
                "rss_before_gib": before / 2**30,
                "peak_gib": peak / 2**30,
                "added_gib": (peak - before) / 2**30,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
