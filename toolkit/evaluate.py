"""Leave-one-section-out cross-validation: the paper's Table 1 on the user's data.

For each section with an image: train on the other image sections, build the retrieval
bank from the training sections (plus any ``bank_sections``, which need no image),
predict the held-out section's spots from its image patches, and score them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mclx.config import Distance, PreprocessCfg, TrainCfg, to_dict
from mclx.data.dataset import build_table
from mclx.data.her2st import read_her2st
from mclx.experiment import (
    PatchCache,
    choose_genes,
    encoder_fingerprint,
    make_preprocess,
    new_model,
    pos_size,
    train_model,
)
from mclx.io import all_or_nothing, atomic_path, write_text_atomic
from mclx.metrics import score

METRICS = ("pcc_acg", "pcc_heg", "mse", "mae")


def cross_validate(
    root: str | os.PathLike,
    *,
    model: str = "mclstexp",
    sections: Sequence[str] | None = None,
    bank_sections: Sequence[str] = (),
    train_cfg: TrainCfg | None = None,
    k: int | None = None,
    distance: Distance | None = None,
    genes_file: str | os.PathLike | None = None,
    n_hvg: int | None = None,
    encoder_weights: str | os.PathLike | None = "auto",
    model_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the cross-validation; return ``{"sections", "mean", "std", "genes", "config"}``."""
    from mclx.train import encode_features, spot_embeddings

    cfg = train_cfg or TrainCfg()
    adatas = read_her2st(root, list(sections) if sections else None, with_image=True)
    if len(adatas) < 2:
        msg = f"{root}: cross-validation needs at least two sections with images"
        raise ValueError(msg)
    extra = (
        read_her2st(root, [s for s in bank_sections if s not in adatas]) if bank_sections else {}
    )
    cache = PatchCache(adatas, PreprocessCfg().patch_size)
    results: dict[str, Any] = {}
    genes_out: dict[str, dict[str, float]] = {}
    run_cfg: dict[str, Any] = {}
    t0 = time.perf_counter()
    for test in adatas:
        train_secs = [s for s in adatas if s != test]
        genes = choose_genes(
            root, {s: adatas[s] for s in train_secs}, genes_file=genes_file, n_hvg=n_hvg
        )
        pre = make_preprocess(genes, list(adatas.values()))
        bank_adatas = {s: adatas[s] for s in train_secs} | extra
        net = new_model(
            model,
            pre,
            pos_size(list(bank_adatas.values())),
            seed=cfg.seed,
            encoder_weights=encoder_weights,
            **(model_overrides or {}),
        )
        k_eff = k if k is not None else net.cfg.k
        dist = distance or net.cfg.distance
        history, _ = train_model(net, cache, train_secs, pre, cfg, progress=progress)
        test_table = build_table({test: adatas[test]}, pre)
        if cfg.freeze_encoder:
            feats = cache.features(net.image_encoder, encoder_fingerprint(net), test, pre)
        else:
            feats = encode_features(net.image_encoder, cache.patches(test), pre)
        if net.kind == "contrastive":
            bank = build_table(bank_adatas, pre)
            keys, values = spot_embeddings(net, bank, seq_len=cfg.batch_size), bank.expr
        else:
            keys = values = None
        pred = predict_from_features(net, feats, keys, values, k=k_eff, distance=dist)
        s = score(pred, test_table.expr)
        genes_out[test] = dict(zip(genes, s.pop("pcc_genes").tolist()))
        results[test] = s | {"n_spots": len(test_table), "final_loss": history[-1]}
        run_cfg = {
            "model": to_dict(net.cfg),
            "train": {k_: v for k_, v in to_dict(cfg).items() if k_ != "extra"},
            "k": k_eff,
            "distance": dist,
            "weighting": net.cfg.weighting,
            "n_genes": len(genes),
            "bank_sections": list(bank_sections),
            "encoder_weights": str(encoder_weights),
        }
    run_cfg["seconds"] = round(time.perf_counter() - t0, 1)
    return _summary(results, run_cfg, genes_out)


def _summary(results: dict[str, Any], config: dict[str, Any], genes: dict) -> dict[str, Any]:
    """Per-section rows plus mean and (population) std of each metric."""
    return {
        "sections": results,
        "mean": {m: float(np.mean([r[m] for r in results.values()])) for m in METRICS},
        "std": {m: float(np.std([r[m] for r in results.values()])) for m in METRICS},
        "config": config,
        "genes": genes,
    }


def predict_from_features(net, feats, keys, values, *, k: int, distance: str) -> np.ndarray:
    """Head on pooled encoder features, then retrieval from (keys, values) for a
    contrastive model; ST-Net's head output is the prediction itself."""
    from mclx.kernels import retrieve
    from mclx.train import image_outputs

    out = image_outputs(net, feats)
    if net.kind != "contrastive":
        return out
    return retrieve(out, keys, values, k, distance=distance, weighting=net.cfg.weighting)


def predict_section(ck, bank, adata, *, k: int | None = None, distance: str | None = None):
    """Evaluation's in-memory path for one section with a fixed checkpoint and bank:
    patches cut from the decoded image, torch FP32 features, head, retrieval."""
    from mclx.data.patches import section_patches
    from mclx.train import encode_features

    bank.check_compatible(ck.fingerprint, ck.preprocess.genes)
    k = k or bank.k
    if ck.model.kind == "contrastive" and k > len(bank):
        msg = f"{bank.path or 'bank'}: k={k} is larger than the bank ({len(bank)} spots)"
        raise ValueError(msg)
    feats = encode_features(
        ck.model.image_encoder, section_patches(adata, ck.preprocess.patch_size), ck.preprocess
    )
    return predict_from_features(
        ck.model,
        feats,
        bank.embeddings,
        bank.expressions,
        k=k,
        distance=distance or bank.distance,
    )


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
    from mclx.bank import load_bank
    from mclx.checkpoint import load_checkpoint

    ck, bank = load_checkpoint(checkpoint), load_bank(bank_path)
    bank.check_compatible(ck.fingerprint, ck.preprocess.genes)  # before reading any data
    if ck.model.kind == "contrastive" and (k or bank.k) > len(bank):
        msg = f"{bank_path}: k={k or bank.k} is larger than the bank ({len(bank)} spots)"
        raise ValueError(msg)
    adatas = read_her2st(root, list(sections), with_image=True)
    overlap = set(sections) & set(bank.sections.tolist())
    if overlap:
        msg = f"{bank_path}: bank contains the scored sections {sorted(overlap)} (leakage)"
        raise ValueError(msg)
    results, genes_out = {}, {}
    for name, adata in adatas.items():
        truth = build_table({name: adata}, ck.preprocess).expr
        s = score(predict_section(ck, bank, adata, k=k, distance=distance), truth)
        genes_out[name] = dict(zip(ck.preprocess.genes, s.pop("pcc_genes").tolist()))
        results[name] = s | {"n_spots": len(truth)}
    config = {
        "checkpoint": str(checkpoint),
        "bank": str(bank_path),
        "k": k or bank.k,
        "distance": distance or bank.distance,
        "n_genes": len(ck.preprocess.genes),
        "fingerprint": ck.fingerprint,
        "seconds": 0.0,
    }
    return _summary(results, config, genes_out)


def format_table(res: dict[str, Any], title: str = "") -> str:
    """Plain-text Table 1: one row per section, then mean +- std."""
    head = f"{'section':<10}{'PCC(ACG)':>14}{'PCC(HEG)':>14}{'MSE':>14}{'MAE':>14}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for name, r in res["sections"].items():
        lines.append(
            f"{name:<10}{r['pcc_acg']:>14.4f}{r['pcc_heg']:>14.4f}{r['mse']:>14.4f}"
            f"{r['mae']:>14.4f}"
        )
    lines.append("-" * len(head))
    m, s = res["mean"], res["std"]
    cells = [f"{m[k]:.4f}±{s[k]:.3f}" for k in METRICS]
    lines.append(f"{'mean±std':<10}{cells[0]:>14}{cells[1]:>14}{cells[2]:>14}{cells[3]:>14}")
    return "\n".join(lines)


def write_results(res: dict[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """JSON (table + config) at ``out`` and per-gene PCCs as CSV beside it."""
    import pandas as pd

    out = Path(out)
    summary = {k: v for k, v in res.items() if k != "genes"}
    csv = out.with_name(out.stem + ".genes.csv")
    table = pd.DataFrame(res["genes"])
    table.index.name = "gene"
    with all_or_nothing():  # both files or neither
        write_text_atomic(out, json.dumps(summary, indent=2) + "\n")
        with atomic_path(csv) as tmp:
            table.to_csv(tmp)
    return out, csv
