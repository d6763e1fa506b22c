"""Where the CPU retrieval's time goes, stage by stage, next to the plain score product.

    python bench/retrieval_stages.py [--n 200000] [--q 4096] [--k 200] [--precision auto]
        [--repeats 3] [--genes 785]

Each repeat runs, in this process and back to back, the plain product ``Q x D`` by
``N x D`` in the kernel's dtype and score tiles (``torch.mm`` into one reused tile, the
floor any exact method pays) and then ``retrieve`` under
:func:`mclx.kernels.retrieval.stage_times`. The table gives each stage's minimum over the
repeats and the ratio of the whole retrieval to the product. ``select (thread)`` runs
beside the product on the selection thread; only ``select wait`` is not hidden by it.
On a shared machine read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from banks import random_bank, random_queries  # noqa: E402
from retrieval_impls import tiled_product, unit_rows  # noqa: E402


def plain_product(queries, keys, dtype) -> float:
    """Seconds of the score product alone, in the kernel's tiles (keys prepared before)."""
    q, kd = unit_rows(queries, dtype), unit_rows(keys, dtype)
    t0 = time.perf_counter()
    tiled_product(q, kd)
    return time.perf_counter() - t0


def one_run(queries, keys, values, k: int, precision: str):
    from mclx.kernels import retrieve
    from mclx.kernels.retrieval import stage_times

    with stage_times() as stages:
        t0 = time.perf_counter()
        retrieve(queries, keys, values, k, precision=precision)
        total = time.perf_counter() - t0
    return total, dict(stages)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--q", type=int, default=4096)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--genes", type=int, default=785)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    import torch

    from mclx.kernels.retrieval import _resolve_precision

    mode = _resolve_precision(a.precision, torch.device("cpu"), a.n, a.k)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    keys, values = random_bank(a.n, g=a.genes)
    queries = random_queries(a.q)
    one_run(queries[:64], keys[: 4 * a.k + 4096], values[: 4 * a.k + 4096], a.k, a.precision)
    runs = []
    for _ in range(a.repeats):
        product = plain_product(queries, keys, dtype)
        total, stages = one_run(queries, keys, values, a.k, a.precision)
        runs.append((product, total, stages))
    report(runs, a, mode)


def report(runs, a, mode: str) -> None:
    """Minimum per stage over the repeats; ratios of total to product per repeat."""
    names = list(dict.fromkeys(name for _, _, st in runs for name in st))
    print(f"N={a.n} Q={a.q} k={a.k} G={a.genes} precision={a.precision} -> {mode}")
    print(f"{'stage':<26}{'min s':>9}  per repeat")
    for name in names:
        vals = [st.get(name, 0) for _, _, st in runs]
        f = "{:.0f}" if all(isinstance(v, int) for v in vals) else "{:.3f}"  # counts
        print(f"{name:<26}{f.format(min(vals)):>9}  " + " ".join(f.format(v) for v in vals))
    products = [p for p, _, _ in runs]
    totals = [t for _, t, _ in runs]
    ratios = [t / p for p, t, _ in runs]
    print(f"{'retrieval total':<26}{min(totals):>9.3f}  " + " ".join(f"{t:.3f}" for t in totals))
    print(
        f"{'plain product (' + mode + ')':<26}{min(products):>9.3f}  "
        + " ".join(f"{p:.3f}" for p in products)
    )
    print(
        f"{'ratio total / product':<26}{min(totals) / min(products):>9.2f}  "
        + " ".join(f"{r:.2f}" for r in ratios)
    )


if __name__ == "__main__":
    main()
