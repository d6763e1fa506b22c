"""bfloat16 candidates with an exactness bound: how many candidates a bf16 scan keeps,
and which rows it proves.

``precision="bf16"`` makes the scores in bfloat16 (AMX on CPU, tensor cores on GPU),
keeps m > k candidates and re-scores them exactly. bfloat16 moves a query's cosine by at
most ``eps_q``, bounded from the measured rounding of that query, of the bank and of the
output (:func:`bf16_sure`); a query whose m-th candidate could still beat its k-th is
redone in float32, so the result is the float32 one. The CPU (``compiled_path``), torch
(``torch_path``) and CuPy (``gpu_select``) paths share these bounds.
"""

from __future__ import annotations

from functools import lru_cache

BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 on this CPU (Linux /proc/cpuinfo)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return frozenset(fh.read().split())
    except OSError:
        return frozenset()


def bf16_candidates(k: int) -> int:
    """Candidates kept from bf16 scores: enough that the exactness window (~0.01 cosine)
    rarely holds more than m - k keys (measured: k + 128 sent half the queries of a
    random 256-d 200k bank to the float32 redo, k + 256 none)."""
    return k + max(256, k // 2)


def bf16_sure(kth, mth, eps):
    """Rows whose float32 top-k surely lies among their bf16 candidates.

    ``kth`` and ``mth`` (Q,) are the k-th best and the worst of each row's m candidate
    bfloat16 scores (the best m of the bank). A bank key's exact cosine is within
    ``eps`` (per row) of its bf16 score before the output rounding, which scales it by
    at most 1 +- 2^-8. The k-th exact score is then at least ``lo(kth) - eps`` and any
    key outside the candidates at most ``hi(mth) + eps``; the row is sure when the
    second is below the first.
    """
    import torch

    u = BF16_U
    kth, mth = kth.double(), mth.double()
    hi = torch.where(mth >= 0, mth / (1 - u), mth / (1 + u))
    lo = torch.where(kth >= 0, kth / (1 + u), kth / (1 - u))
    return hi + eps < lo - eps


def bf16_eps(qn, width: int, key_err: float):
    """Per-query bound on |bf16 score before output rounding - exact cosine|: the
    measured bf16 rounding error of the unit query (a) and the largest of the bank's unit
    keys (b) give |a| + |b| + |a||b|, plus float32 accumulation over ``width`` terms
    and the float32 normalisation (1e-6)."""
    import torch

    a = (qn.to(torch.bfloat16).float() - qn).norm(dim=1)
    return bf16_eps_from(a, width, key_err)


def bf16_eps_from(a, width: int, key_err: float):
    """:func:`bf16_eps` from the queries' measured rounding errors ``a`` (Q,)."""
    a = a.double()
    acc = width * 2.0**-24 * (1 + a) * (1 + key_err)
    return a + key_err + a * key_err + acc + 1e-6
