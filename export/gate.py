"""The parity gate on the task: what a reduced-precision encoder gives the user.

An exported encoder is judged on held-back calibration spots (real patches, see
:func:`mclx.export.calib.calibration_set`) by what retrieval makes of its embeddings,
against what it makes of PyTorch FP32's on the same patches:

- ``topk_overlap``: the mean fraction of FP32's top-k bank spots that the candidate's
  top-k also holds (a contrastive model; the bank is the calibration sections' other
  spots);
- ``gene_corr``: the Pearson correlation across the held-back spots of each gene's
  predicted expression, candidate against FP32; the gate reads its median over genes
  (``gene_corr_median``) and records the worst gene (``gene_corr_min``);
- ``pcc_acg`` / ``pcc_acg_fp32``: the mean per-gene PCC against the spots' measured
  expression, of the candidate and of FP32; the gate reads the drop.

The embeddings' cosine to FP32 (:mod:`mclx.export.parity`) stays in the record as a
diagnostic. Without measured expression (a folder of images, random pixels) there is no
task to judge and the cosine is the gate. The thresholds live beside the formats table
(:data:`mclx.inference.formats.TASK_GATE`) so that ``--backend auto`` reads them too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mclx.inference.formats import TASK_GATE


def judge(reference: np.ndarray, candidate: np.ndarray, cal) -> dict[str, Any]:
    """The task record of ``candidate`` embeddings (or outputs) against the FP32
    ``reference`` on the held-back spots of ``cal`` (a ``CalibrationSet``); empty when
    ``cal`` has no measured expression."""
    from mclx.evaluation.metrics import pearson_per_gene

    if cal.truth is None:
        return {}
    bad = int((~np.isfinite(np.asarray(candidate))).any(axis=1).sum())
    if bad:  # a query of NaN / inf retrieves nothing: the gate fails, it does not crash
        nan = float("nan")
        overlap = 0.0 if cal.bank is not None else None
        return {"k": getattr(cal.bank, "k", None), "nonfinite_rows": bad, "topk_overlap": overlap,
                "gene_corr_median": nan, "gene_corr_min": nan, "pcc_acg": nan,
                "pcc_acg_fp32": nan, "spots": int(len(cal.truth))}  # fmt: skip
    k = None
    if cal.bank is not None:
        k = int(cal.bank.k)
        ref_idx, ref_pred = _retrieve(reference, cal.bank)
        got_idx, got_pred = _retrieve(candidate, cal.bank)
        overlap = _overlap(ref_idx, got_idx)
    else:  # a model that predicts expression itself
        ref_pred, got_pred, overlap = reference, candidate, None
    corr = pearson_per_gene(got_pred, ref_pred)
    corr = corr[np.isfinite(corr)]
    pcc, pcc_ref = (_mean(pearson_per_gene(p, cal.truth)) for p in (got_pred, ref_pred))
    return {
        "k": k,
        "topk_overlap": overlap,
        "gene_corr_median": float(np.median(corr)) if len(corr) else float("nan"),
        "gene_corr_min": float(corr.min()) if len(corr) else float("nan"),
        "pcc_acg": pcc,
        "pcc_acg_fp32": pcc_ref,
        "spots": int(len(cal.truth)),
    }


def failures(task: dict[str, Any]) -> list[str]:
    """Which thresholds a task record misses, in words (for the refusal message)."""
    out = [f"{task['nonfinite_rows']} embeddings not finite"] if task.get("nonfinite_rows") else []
    overlap = task.get("topk_overlap")
    if overlap is not None and not overlap >= TASK_GATE["topk_overlap"]:
        out.append(f"top-{task['k']} overlap {overlap:.3f} < {TASK_GATE['topk_overlap']}")
    med = task.get("gene_corr_median", float("nan"))
    if not med >= TASK_GATE["gene_corr_median"]:
        out.append(f"median per-gene correlation {med:.3f} < {TASK_GATE['gene_corr_median']}")
    drop = task.get("pcc_acg_fp32", 0.0) - task.get("pcc_acg", float("nan"))
    if not drop <= TASK_GATE["pcc_acg_drop"]:
        out.append(f"PCC(ACG) drop {drop:.4f} > {TASK_GATE['pcc_acg_drop']}")
    return out


def _retrieve(embeddings: np.ndarray, bank) -> tuple[np.ndarray, np.ndarray]:
    """The top-k bank rows of each query (by cosine, as :func:`mclx.kernels.retrieve`
    ranks them) and the prediction retrieval makes of them."""
    from mclx.inference.predict import match

    q = np.asarray(embeddings, np.float64)
    b = np.asarray(bank.embeddings, np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    k = min(int(bank.k), len(b))
    idx = np.argpartition(-(q @ b.T), k - 1, axis=1)[:, :k]
    pred = match(np.asarray(embeddings, np.float32), bank)
    return idx, np.asarray(pred, np.float64)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(x, y)) / len(x) for x, y in zip(a, b)]))


def _mean(r: np.ndarray) -> float:
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
