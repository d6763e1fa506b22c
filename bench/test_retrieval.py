"""Retrieval kernel vs mclSTExp's reference loop vs FAISS exact search, side by side.

Q = 4,096 queries, k = 200, 256-d embeddings, 785 genes, float32, banks of
N = 13,620 (all HER2+ spots), 200,000 and 2,000,000 (the reference materialises the
Q x N similarity matrix, so it runs at the first two only). Each group is one N; read
the ratios in pytest-benchmark's table, queries/s in extra_info. Each group also has the
plain score product of the same shapes in the precision the kernel picks (``auto``:
``bf16_product`` on AMX, ``fp32_product`` elsewhere; unit keys prepared outside the
timing, the kernel's tiles), the floor of any exact method; ``bench/retrieval_stages.py``
breaks the kernel's time down next to it.

    pytest bench/test_retrieval.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from banks import random_bank, random_queries
from retrieval_impls import faiss_exact, reference_loop, tiled_product, unit_rows

from mclx.kernels import retrieve

Q, K = 4096, 200


def product_impl(n: int) -> str:
    """``bf16_product`` or ``fp32_product``: the product in the precision ``auto`` picks."""
    import torch

    from mclx.kernels.retrieval import _resolve_precision

    return f"{_resolve_precision('auto', torch.device('cpu'), n, K)}_product"


CASES = [
    (n, impl)
    for n in (13_620, 200_000, 2_000_000)
    for impl in ("kernel", product_impl(n), "kernel_fp32", "faiss", "reference")
    if not (impl == "reference" and n > 200_000)
]


@lru_cache(maxsize=1)  # one bank in memory at a time (2M spots: 8.3 GB)
def bank(n: int):
    return random_bank(n)


@lru_cache(maxsize=1)
def unit_bank(n: int, impl: str):
    """Unit keys of ``bank(n)`` in the product's dtype (1 GB in bf16 at N = 2M)."""
    import torch

    return unit_rows(bank(n)[0], torch.bfloat16 if impl == "bf16_product" else torch.float32)


def run(impl: str, queries, keys, values):
    if impl.endswith("_product"):
        kd = unit_bank(len(keys), impl)
        return tiled_product(unit_rows(queries, kd.dtype), kd)
    if impl == "kernel":
        return retrieve(queries, keys, values, K)
    if impl == "kernel_fp32":
        return retrieve(queries, keys, values, K, precision="fp32")
    if impl == "faiss":
        return faiss_exact(queries, keys, values, K)
    return reference_loop(queries, keys, values, K)


@pytest.mark.parametrize(("n", "impl"), CASES, ids=[f"N{n}-{i}" for n, i in CASES])
def test_retrieval(benchmark, n, impl):
    if impl == "faiss":
        pytest.importorskip("faiss", reason="faiss-cpu not installed (pip install .[bench])")
    keys, values = bank(n)
    queries = random_queries(Q)
    benchmark.group = f"retrieval N={n}"
    rounds = 3 if n <= 200_000 else 1
    if impl.endswith("_product"):
        unit_bank(n, impl)  # prepared before the timing: the product alone is timed
    out = benchmark.pedantic(
        run, args=(impl, queries, keys, values), rounds=rounds, iterations=1, warmup_rounds=0
    )
    assert impl.endswith("_product") or out.shape == (Q, values.shape[1])
    benchmark.extra_info["queries_per_s"] = Q / benchmark.stats.stats.min


@pytest.mark.parametrize("impl", ["kernel", "faiss"])
def test_peak_memory_2m(benchmark, impl):
    """Peak RSS of one call at N = 2,000,000 in a fresh process (bank + scratch)."""
    if impl == "faiss":
        pytest.importorskip("faiss", reason="faiss-cpu not installed (pip install .[bench])")
    script = Path(__file__).with_name("peak_memory.py")
    benchmark.group = "peak memory N=2000000"

    def measure():
        res = subprocess.run(
            [sys.executable, str(script), impl, "2000000"],
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(res.stdout.strip().splitlines()[-1])

    info = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    print(json.dumps(info))
    if impl == "kernel":
        assert info["added_gib"] < 1.0, info  # the bound: bank + 1 GiB
