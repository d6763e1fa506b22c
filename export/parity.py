"""Agreement of an exported encoder with PyTorch FP32 on the same patches, and each
export row's line and record in the report: that agreement (a diagnostic), the task
gate's numbers (:mod:`mclx.export.gate`), whether the row's parity held, and what the
user is told when it did not."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mclx.inference.formats import MAX_REL_ERR_FP32, MIN_COSINE


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """``max_rel_err``: max |a - b| over max |a|; ``min_cosine``: worst per-row cosine."""
    ref = np.asarray(reference, np.float64)
    got = np.asarray(candidate, np.float64)
    if ref.shape != got.shape:
        msg = f"embedding shapes differ: {ref.shape} vs {got.shape}"
        raise ValueError(msg)
    rel = float(np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-12))
    num = (ref * got).sum(1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = num / np.maximum(den, 1e-12)
    return {"max_rel_err": rel, "min_cosine": float(cos.min()), "n": int(len(ref))}


def record(job, fmt: str, path: Path, precision: str, reference, got, log) -> dict[str, Any]:
    """The parity record of one row: the embeddings' agreement (a diagnostic), the task
    gate's numbers where the calibration spots have expression (``task``), which gate
    applies (``gate``) and whether it ``held``, and the builder's notes."""
    from mclx.export.gate import judge
    from mclx.inference.formats import parity_held

    res = compare(reference, got)
    task = judge(reference, got, job.cal) if job.cal is not None else {}
    entry = {"path": str(path), "precision": precision, **res, **job.notes.get(fmt, {})}
    if task:
        entry["task"] = task
    entry["gate"] = "task" if task else "cosine"
    entry["held"] = parity_held(fmt, {fmt: entry}) if precision != "fp32" else True
    log(
        f"{fmt:<13} {precision:<5} max rel err {res['max_rel_err']:.2e}  "
        f"min cosine {res['min_cosine']:.6f}{_task_words(task)}  {_outcome(path, entry)}"
    )
    return entry


def _task_words(task: Mapping[str, Any]) -> str:
    if not task:
        return ""
    overlap = task["topk_overlap"]
    words = f"  top-{task['k']} overlap {overlap:.3f}" if overlap is not None else ""
    return (
        f"{words}  gene corr {task['gene_corr_median']:.4f}  "
        f"PCC(ACG) {task['pcc_acg']:.4f} (fp32 {task['pcc_acg_fp32']:.4f})"
    )


def _outcome(path: Path, entry: Mapping[str, Any]) -> str:
    """``-> path`` for a row whose parity held; FAILED, why, and what to do else."""
    from mclx.export.gate import failures

    precision = entry["precision"]
    if precision == "fp32" and entry["max_rel_err"] > MAX_REL_ERR_FP32:
        return f"FAILED parity (relative error > {MAX_REL_ERR_FP32:.0e}): {path} not usable"
    if entry["held"]:
        return f"-> {path}"
    why = "; ".join(failures(entry["task"])) if entry.get("task") else f"cosine < {MIN_COSINE}"
    return (
        f"FAILED parity ({why}): --backend auto will not use it; for "
        f"{precision.upper()} train with --recipe paper or real encoder weights (docs/inference.md)"
    )
