"""The comparison table (issue #28): several models cross-validated by one command
(``mclx evaluate --model mclstexp,bleep,...``), one row each in the paper's layout.

Every model runs :func:`~mclx.evaluation.evaluate.cross_validate` on the same sections
with the same options; the models share one patch cache per patch size, so the patches
are cut once and a frozen encoder's features computed once for every model whose encoder
is the same (the random-init or given weights drawn by the same seed). The table has
PCC(ACG), PCC(HEG), PCC(HVG), MSE and MAE as mean ± std over the held-out sections, and
each model's time (its folds' training and prediction; the features it found cached are
not counted again).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mclx.evaluation.evaluate import METRICS, cross_validate, result_paths, write_result_files
from mclx.files import all_or_nothing, write_text_atomic

HEADERS = {
    "pcc_acg": "PCC(ACG)",
    "pcc_heg": "PCC(HEG)",
    "pcc_hvg": "PCC(HVG)",
    "mse": "MSE",
    "mae": "MAE",
}


def compare(root, recipes: Sequence[Any], *, echo=None, **kw: Any) -> dict[str, dict[str, Any]]:
    """Cross-validate each recipe (``kw``: :func:`cross_validate`'s options) with one
    shared patch cache per patch size; return ``{model: results}`` in the given order.
    ``echo`` (a callable) hears each model's table as it finishes."""
    from mclx.evaluation.evaluate import format_table

    caches: dict[int, Any] = {}
    out: dict[str, dict[str, Any]] = {}
    for recipe in recipes:
        res = cross_validate(root, recipe, caches=caches, **kw)
        out[recipe.model] = res
        if echo is not None:
            echo(format_table(res, title=f"{recipe.model} ({res['config']['seconds']} s)"))
    return out


def rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model: each metric's mean and std over the held-out sections, the
    sections' count and the model's seconds."""
    table = []
    for model, res in results.items():
        row: dict[str, Any] = {"model": model}
        for m in METRICS:
            row[m] = res["mean"][m]
            row[f"{m}_std"] = res["std"][m]
        row["sections"] = len(res["sections"])
        row["seconds"] = res["config"]["seconds"]
        table.append(row)
    return table


def to_csv(table: list[dict[str, Any]]) -> str:
    """The rows as CSV (one column per mean and per std)."""
    cols = ["model", *(c for m in METRICS for c in (m, f"{m}_std")), "sections", "seconds"]
    lines = [",".join(cols)]
    for r in table:
        lines.append(",".join(_cell(r[c]) for c in cols))
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def to_markdown(table: list[dict[str, Any]], title: str = "") -> str:
    """The rows as a Markdown table in the paper's layout: mean ± std per metric, time."""
    head = ["model", *(HEADERS[m] for m in METRICS), "time (s)"]
    lines = [title, ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["model"], *(f"{r[m]:.3f} ± {r[f'{m}_std']:.3f}" for m in METRICS)]
        lines.append("| " + " | ".join([*cells, f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def table_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """The table's CSV and Markdown files for ``--out`` (its suffix replaced)."""
    out = Path(out)
    return out.with_suffix(".csv"), out.with_suffix(".md")


def model_out(out: str | os.PathLike, model: str) -> Path:
    """Where one model's full results go: ``OUT.MODEL.json`` beside the table."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{model}.json")


def output_paths(out: str | os.PathLike, models: Sequence[str]) -> list[Path]:
    """Every file :func:`write_comparison` writes."""
    paths = list(table_paths(out))
    for m in models:
        paths += list(result_paths(model_out(out, m)))
    return paths


def write_comparison(
    results: dict[str, dict[str, Any]], out: str | os.PathLike, title: str = ""
) -> tuple[Path, Path]:
    """The table as CSV and Markdown, and each model's results (JSON, per-gene CSV,
    predictions) beside it: all of them or none."""
    csv, md = table_paths(out)
    table = rows(results)
    with all_or_nothing():
        write_text_atomic(csv, to_csv(table))
        write_text_atomic(md, to_markdown(table, title))
        for model, res in results.items():
            write_result_files(res, model_out(out, model))
    return csv, md
