"""Leave-one-section-out cross-validation: the paper's Table 1 on the user's data.

For each section with an image: train on the other image sections, build the retrieval
bank from the training sections (plus any ``bank_sections``, which need no image),
predict the held-out section's spots from its image patches, and score them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mclx.config import Distance, to_dict
from mclx.data.dataset import build_table
from mclx.evaluation.metrics import score
from mclx.files import all_or_nothing, atomic_path, write_text_atomic
from mclx.training.context import section_features
from mclx.training.features import PatchCache
from mclx.training.recipe import Recipe
from mclx.training.run import train_model

METRICS = ("pcc_acg", "pcc_heg", "pcc_hvg", "mse", "mae")


def cross_validate(
    root: str | os.PathLike,
    recipe: Recipe | None = None,
    *,
    sections: Sequence[str] | None = None,
    bank_sections: Sequence[str] = (),
    k: int | None = None,
    distance: Distance | None = None,
    progress: bool = True,
    caches: dict[int, PatchCache] | None = None,
) -> dict[str, Any]:
    """Run the cross-validation; return ``{"sections", "mean", "std", "genes", "config"}``.

    Args:
        recipe: how each fold's model is made and trained (default: the reference).
        sections: image sections to hold out in turn (default: all with images).
        bank_sections: sections (image or not) whose spots join every fold's bank.
        k, distance: retrieval settings (default: the model's).
        caches: patch caches by patch size, shared by runs on the same data (compare).
    """
    from mclx.data.readers import open_data

    recipe, data = recipe or Recipe(), open_data(root)
    adatas = data.read(list(sections) if sections else None, with_image=True)
    if len(adatas) < 2:
        msg = f"{data.root}: cross-validation needs at least two sections with images"
        raise ValueError(msg)
    extra_adatas = _extra_sections(data, recipe, adatas, bank_sections)
    _check_k(data.root, recipe, adatas, extra_adatas, k)
    cache = _shared_cache(caches, adatas, recipe.patch_size())
    results: dict[str, Any] = {}
    genes_out: dict[str, dict[str, float]] = {}
    panels: dict[str, dict[str, Any]] = {}
    preds: dict[str, Any] = {}
    t0 = time.perf_counter()
    for i, test in enumerate(adatas, 1):
        fold = _Fold(data, recipe, adatas, extra_adatas, test)
        if progress:  # where a long run is, between the encoders' progress bars
            print(f"fold {i}/{len(adatas)}: {fold}", file=sys.stderr, flush=True)
        row, genes_out[test], preds[test] = fold.run(
            cache, k=k, distance=distance, progress=progress
        )
        results[test] = row
        panels[test] = {"train": fold.train, "genes": list(fold.pre.genes)}
    config = fold.config(k, distance) | {
        "recipe": recipe.name,
        "data": str(data.root),
        "layout": data.name,
        "bank_sections": list(bank_sections),
        "gene_panel": recipe.gene_panel(data),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return _summary(results, config, genes_out) | {"folds": panels, "predictions": preds}


def _extra_sections(data, recipe: Recipe, adatas, bank_sections: Sequence[str]):
    """The ``bank_sections`` that are not held out in turn, read (they join every fold's
    bank); refused for a model whose bank holds image features."""
    from mclx.bank import image_bank

    extra = [s for s in bank_sections if s not in adatas]
    if extra and image_bank(recipe.model):
        msg = (
            f"{data.root}: a {recipe.model} bank holds image features; --bank-sections "
            f"{', '.join(extra)} are not cross-validated image sections (build such a bank "
            "with 'mclx bank build')"
        )
        raise ValueError(msg)
    return data.read(extra) if extra else {}


def _shared_cache(caches: dict[int, PatchCache] | None, adatas, size: int) -> PatchCache:
    """The patch cache of ``size`` px patches in ``caches`` (added when absent)."""
    if caches is None:
        return PatchCache(adatas, size)
    return caches.setdefault(size, PatchCache(adatas, size))


def _check_k(root, recipe: Recipe, adatas, extra, k: int | None) -> None:
    """Before any training: every fold's bank (the other sections) holds at least k spots."""
    from mclx.models import model_cfg

    k = k or model_cfg(recipe.model, **recipe.overrides).k
    if not k:  # a regression model: no retrieval
        return
    spots = {s: a.n_obs for s, a in adatas.items()}
    bank = sum(spots.values()) + sum(a.n_obs for a in extra.values())
    test = max(spots, key=spots.get)  # the fold with the smallest bank
    if bank - spots[test] < k:
        msg = (
            f"{root}: k={k} is larger than the bank of the fold that holds out {test} "
            f"({bank - spots[test]} spots); pass a smaller --k or more --bank-sections"
        )
        raise ValueError(msg)


class _Fold:
    """One held-out section: train on the others, bank them (and the extra sections),
    predict the held-out spots from their patches and score them."""

    def __init__(self, data, recipe: Recipe, adatas, extra, test: str) -> None:
        self.recipe, self.test, self.adatas = recipe, test, adatas
        self.train = [s for s in adatas if s != test]
        self.bank_adatas = {s: adatas[s] for s in self.train} | extra
        self.pre, self.net = recipe.setup(data, adatas | extra, self.train)

    def __str__(self) -> str:
        return f"held out {self.test}, training on {len(self.train)} sections"

    def run(self, cache: PatchCache, *, k, distance, progress: bool):
        from mclx.bank import bank_from_model, image_bank
        from mclx.inference import match
        from mclx.inference.embed import head_outputs

        net, pre = self.net, self.pre
        fitted: dict[str, Any] = {}  # ridge's alpha, a validation split's epoch kept
        history, _ = train_model(
            net, cache, self.train, pre, self.recipe.train, progress=progress, report=fitted
        )
        bank = None
        if net.kind == "contrastive":
            table = build_table(self.bank_adatas, pre)
            feats = None
            if image_bank(net):  # knn: the bank spots' own image features
                feats = np.concatenate(
                    [section_features(cache, net, s, pre) for s in self.bank_adatas]
                )
            bank = bank_from_model(net, table, pre.genes, fingerprint="fold", features=feats)
        feats = section_features(cache, net, self.test, pre)
        table = build_table({self.test: self.adatas[self.test]}, pre)
        out = head_outputs(net, feats, positions=table.pos)  # positions: HisToGene's
        pred, truth = match(out, bank, k=k, distance=distance), table.expr
        s = score(pred, truth)
        genes = dict(zip(pre.genes, s.pop("pcc_genes").tolist()))
        n = self.adatas[self.test].n_obs
        held_out = prediction_adata(self.adatas[self.test], pred, truth, pre.genes)
        row = s | {"n_spots": n, "final_loss": history[-1]} | _fold_record(fitted)
        return row, genes, held_out

    def config(self, k: int | None, distance: str | None) -> dict[str, Any]:
        """The fold's model, preprocessing (genes aside) and retrieval settings."""
        net, pre = self.net, self.pre
        return {
            "model": to_dict(net.cfg),
            "preprocess": {k_: v for k_, v in to_dict(pre).items() if k_ != "genes"},
            "train": to_dict(self.recipe.train),
            "k": k or net.cfg.k,
            "distance": distance or net.cfg.distance,
            "weighting": net.cfg.weighting,
            "n_genes": len(pre.genes),
            "encoder_weights": str(self.recipe.encoder_weights),
        }


def _fold_record(fitted: dict[str, Any]) -> dict[str, Any]:
    """What a fold's fit chose, for its results row: ridge's cross-validated alpha (and
    its PCA size), the epoch a validation split kept."""
    keys = ("ridge_alpha", "pca_components", "best_epoch")
    return {k: fitted[k] for k in keys if k in fitted}


def prediction_adata(adata, pred: np.ndarray, truth: np.ndarray, genes: Sequence[str]):
    """A held-out section's predictions as AnnData: ``X`` predicted and
    ``layers["measured"]`` measured (preprocessed) expression, the section's ``obs``
    (array and pixel coordinates, labels when it has them) and ``obsm["spatial"]``;
    ``uns["sections"][name]`` its image and µm/px. What ``mclx analyze`` reads."""
    import anndata as ad
    import pandas as pd

    out = ad.AnnData(
        X=np.asarray(pred, np.float32),
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=pd.Index([str(g) for g in genes])),
    )
    out.layers["measured"] = np.asarray(truth, np.float32)
    out.obsm["spatial"] = np.asarray(adata.obsm["spatial"], np.float64)
    name = str(adata.uns.get("section"))
    info = {k: adata.uns.get(k) for k in ("image_path", "mpp", "layout", "array")}
    out.uns["sections"] = {name: {k: v for k, v in info.items() if v is not None}}
    return out


def _summary(results: dict[str, Any], config: dict[str, Any], genes: dict) -> dict[str, Any]:
    """Per-section rows plus mean and (population) std of each metric."""
    return {
        "sections": results,
        "mean": {m: float(np.mean([r[m] for r in results.values()])) for m in METRICS},
        "std": {m: float(np.std([r[m] for r in results.values()])) for m in METRICS},
        "config": config,
        "genes": genes,
    }


def score_checkpoint(
    checkpoint,
    bank_path,
    root,
    sections: Sequence[str],
    *,
    k: int | None = None,
    distance: str | None = None,
) -> dict[str, Any]:
    """Table 1 for a trained checkpoint and bank on ``sections`` (no training)."""
    from mclx.checkpoint import load_checkpoint
    from mclx.data.patches import model_patches
    from mclx.data.readers import open_data
    from mclx.inference import predict
    from mclx.inference.device import torch_device
    from mclx.inference.encoders import TorchEncoder

    ck = load_checkpoint(checkpoint)
    bank = _scoring_bank(ck, checkpoint, bank_path, sections, k)  # before reading any data
    adatas = open_data(root).read(list(sections), with_image=True)
    encoder = TorchEncoder(ck, device=torch_device().type)
    results, genes_out = {}, {}
    section = ck.model.kind == "section"  # HisToGene: each section at once, with positions
    for name, adata in adatas.items():
        table = build_table({name: adata}, ck.preprocess)
        patches = model_patches(adata, ck.preprocess)
        pos = table.pos if section else None
        pred = predict(encoder, patches, bank, k=k, distance=distance, positions=pos)
        s, truth = score(pred, table.expr), table.expr
        genes_out[name] = dict(zip(ck.preprocess.genes, s.pop("pcc_genes").tolist()))
        results[name] = s | {"n_spots": len(truth)}
    config = {
        "checkpoint": str(checkpoint),
        "bank": str(bank_path) if bank_path else "",
        "k": k or (bank.k if bank is not None else 0),
        "distance": distance or (bank.distance if bank is not None else ""),
        "n_genes": len(ck.preprocess.genes),
        "fingerprint": ck.fingerprint,
        "seconds": 0.0,
    }
    return _summary(results, config, genes_out)


def _scoring_bank(ck, checkpoint, bank_path, sections: Sequence[str], k: int | None):
    """The bank a contrastive checkpoint retrieves from, checked against it (same
    checkpoint and genes, k, none of the scored sections) before any data is read;
    None for a model that predicts directly (a bank given to one is still checked)."""
    from mclx.bank import load_bank

    if bank_path is None:
        if ck.model.kind == "contrastive":
            msg = f"{checkpoint}: a {ck.model_cfg.name} model retrieves from a bank: pass --bank"
            raise ValueError(msg)
        return None
    loaded = load_bank(bank_path)
    loaded.check_compatible(ck.fingerprint, ck.preprocess.genes)
    overlap = set(sections) & set(loaded.sections.tolist())
    if overlap:
        msg = f"{bank_path}: bank contains the scored sections {sorted(overlap)} (leakage)"
        raise ValueError(msg)
    if ck.model.kind != "contrastive":
        return None  # ST-Net, HisToGene: no retrieval
    loaded.check_k(k)
    return loaded


def format_table(res: dict[str, Any], title: str = "") -> str:
    """Plain-text Table 1: one row per section, then mean +- std."""
    names = {"pcc_acg": "PCC(ACG)", "pcc_heg": "PCC(HEG)", "pcc_hvg": "PCC(HVG)"}
    head = f"{'section':<10}" + "".join(f"{names.get(m, m.upper()):>14}" for m in METRICS)
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for name, r in res["sections"].items():
        lines.append(f"{name:<10}" + "".join(f"{r.get(m, np.nan):>14.4f}" for m in METRICS))
    lines.append("-" * len(head))
    m, s = res["mean"], res["std"]
    lines.append(f"{'mean±std':<10}" + "".join(f"{m[k]:.4f}±{s[k]:.3f}".rjust(14) for k in METRICS))
    return "\n".join(lines)


def result_paths(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """The files :func:`write_results` writes for ``out``: the JSON, the per-gene CSV
    and the held-out predictions beside it."""
    out = Path(out)
    csv, preds = out.stem + ".genes.csv", out.stem + ".predictions.h5ad"
    return out, out.with_name(csv), out.with_name(preds)


def write_results(res: dict[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """JSON (table + config) at ``out`` and per-gene PCCs as CSV beside it (and the
    held-out predictions): every file or none."""
    with all_or_nothing():
        return write_result_files(res, out)


def write_result_files(res: dict[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """:func:`write_results`' files, each atomic; inside the caller's
    :func:`~mclx.files.all_or_nothing` block they commit with its other files."""
    import pandas as pd

    out, csv, pred_path = result_paths(out)
    preds = res.get("predictions") or {}
    summary = {k: v for k, v in res.items() if k not in ("genes", "predictions")}
    if preds:
        summary["predictions"] = pred_path.name
    table = pd.DataFrame(res["genes"])
    table.index.name = "gene"
    write_text_atomic(out, json.dumps(summary, indent=2) + "\n")
    with atomic_path(csv) as tmp:
        table.to_csv(tmp)
    if preds:
        with atomic_path(pred_path, suffix=".h5ad") as tmp:
            joined_predictions(preds).write_h5ad(tmp)
    return out, csv


def joined_predictions(preds: dict[str, Any]):
    """The held-out sections' predictions in one AnnData (``obs["section"]`` tells them
    apart; a gene outside a fold's panel is NaN in that section's rows)."""
    import anndata as ad

    joined = ad.concat(list(preds.values()), join="outer", merge="same", uns_merge="first")
    joined.uns["sections"] = {k: v for p in preds.values() for k, v in p.uns["sections"].items()}
    return joined
