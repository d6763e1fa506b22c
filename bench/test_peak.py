"""The physical limit beside the encoder rows: plain matrix products on the same cores.

BF16 (oneDNN; AMX tiles where the CPU has them) and INT8 (``torch._int_mm``) square
products, and FP32 for reference, in TFLOP/s (TOP/s for INT8) in extra_info.
``bench/test_encoder.py`` reports each encoder's rate as TFLOP/s too (DenseNet-121:
5.7 GFLOP per 224 px image), so the encoder's share of the limit is their ratio within
one run. ``bench/default_recipe_formats.py`` prints the same shares for the default
recipe's formats.

    pytest bench/test_peak.py bench/test_encoder.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest

N = 2048


def _operands(kind: str):
    import torch

    if kind == "int8":
        if not hasattr(torch, "_int_mm"):
            pytest.skip("this torch has no int8 matrix product (torch._int_mm)")
        a = torch.randint(-128, 127, (N, N), dtype=torch.int8)
        return a, a.clone(), torch._int_mm
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[kind]
    a = torch.randn(N, N).to(dtype)
    return a, a.clone(), torch.mm


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_matrix_product(benchmark, kind):
    a, b, op = _operands(kind)
    try:
        op(a, b)
    except RuntimeError as exc:
        pytest.skip(f"{kind} product unavailable here: {exc}")
    benchmark.group = f"matrix product {N}x{N} (the cores' limit)"
    benchmark.pedantic(op, args=(a, b), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tflops"] = 2 * N**3 / benchmark.stats.stats.min / 1e12
