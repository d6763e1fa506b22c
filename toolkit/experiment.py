"""From a data folder to a trained model: gene choice, tables, feature cache, checkpoint.

Shared by ``mclx train`` and ``mclx evaluate`` so both follow one recipe.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mclx.config import ModelCfg, PreprocessCfg, TrainCfg, to_dict
from mclx.data.dataset import SpotTable, build_table
from mclx.data.her2st import find_data_root
from mclx.data.patches import section_patches
from mclx.data.preprocess import check_genes, highly_variable_genes, load_gene_list

if TYPE_CHECKING:
    from mclx.train_state import StateFile

GENE_LIST_NAME = "her_hvg_cut_1000.npy"


def default_gene_file(root: str | os.PathLike) -> Path | None:
    """her2st's gene list beside the data folder, when present."""
    data = find_data_root(root)
    for folder in (data, data.parent):
        if (folder / GENE_LIST_NAME).is_file():
            return folder / GENE_LIST_NAME
    return None


def choose_genes(
    root: str | os.PathLike,
    train: Mapping[str, Any],
    *,
    genes_file: str | os.PathLike | None = None,
    n_hvg: int | None = None,
) -> list[str]:
    """A given gene list, her2st's default list, or HVGs over the training sections."""
    if n_hvg:
        return highly_variable_genes(list(train.values()), n_top=n_hvg)
    path = Path(genes_file) if genes_file else default_gene_file(root)
    if path is None:
        return highly_variable_genes(list(train.values()), n_top=1000)
    genes = load_gene_list(path)
    for a in train.values():
        check_genes(a, genes)
    return genes


def pos_size(adatas: Sequence[Any]) -> tuple[int, int]:
    """Positional table sizes: largest array coordinate over the sections + 1."""
    return (
        int(max(a.obs["x"].max() for a in adatas)) + 1,
        int(max(a.obs["y"].max() for a in adatas)) + 1,
    )


def make_preprocess(genes: Sequence[str], adatas: Sequence[Any], **kw: Any) -> PreprocessCfg:
    """PreprocessCfg with the sections' median estimated µm/px."""
    mpps = [a.uns.get("mpp") for a in adatas if a.uns.get("image_path") and a.uns.get("mpp")]
    return PreprocessCfg(genes=tuple(genes), mpp=float(np.median(mpps)) if mpps else None, **kw)


class PatchCache:
    """Patches cut once per section, and frozen-encoder features once per encoder."""

    def __init__(self, adatas: Mapping[str, Any], patch_size: int) -> None:
        self.adatas = adatas
        self.patch_size = patch_size
        self._patches: dict[str, np.ndarray] = {}
        self._features: dict[tuple[str, str], np.ndarray] = {}

    def patches(self, section: str) -> np.ndarray:
        if section not in self._patches:
            self._patches[section] = section_patches(self.adatas[section], self.patch_size)
        return self._patches[section]

    def table(self, sections: Sequence[str], pre: PreprocessCfg) -> SpotTable:
        table = build_table({s: self.adatas[s] for s in sections}, pre)
        table.patches = np.concatenate([self.patches(s) for s in sections])
        return table

    def features(self, encoder, encoder_fp: str, section: str, pre, **kw: Any) -> np.ndarray:
        from mclx.train import encode_features

        key = (encoder_fp, section)
        if key not in self._features:
            self._features[key] = encode_features(encoder, self.patches(section), pre, **kw)
        return self._features[key]


def new_model(
    name: str,
    pre: PreprocessCfg,
    pos: tuple[int, int],
    *,
    seed: int,
    encoder_weights: str | os.PathLike | None = "auto",
    **overrides: Any,
):
    """Seeded model of ``name`` sized for ``pre.genes`` and ``pos``."""
    from mclx.models import create_model
    from mclx.train import seed_everything

    seed_everything(seed)
    cfg = ModelCfg.for_model(name, n_genes=len(pre.genes), pos_size=pos, **overrides)
    return create_model(cfg, encoder_weights=encoder_weights)


def encoder_fingerprint(model) -> str:
    from mclx.checkpoint import fingerprint

    return fingerprint(model.image_encoder.state_dict())


def train_model(
    model,
    cache: PatchCache,
    sections: Sequence[str],
    pre: PreprocessCfg,
    cfg: TrainCfg,
    *,
    progress: bool = True,
    state: StateFile | None = None,
) -> tuple[list[float], SpotTable]:
    """Fit ``model`` on the image spots of ``sections``; return loss history and table.

    Args:
        state: save a resumable state after each epoch, and continue from the one it
            loaded (if any) once the run's record (completed here with the data digest
            and, for a frozen encoder, its fingerprint) is checked against it.
    """
    from mclx.errors import FormatError
    from mclx.train import StateMismatch, fit

    table = cache.table(sections, pre)
    feats = None
    fp = encoder_fingerprint(model) if cfg.freeze_encoder else None
    start = on_epoch = None
    if state is not None:
        from mclx.train_state import data_digest

        state.record.update(data=data_digest(table), n_spots=len(table), encoder=fp)
        start = state.start(cfg.epochs)  # before the (slow) feature pass

        def on_epoch(epoch, snapshot):
            state.on_epoch(epoch, cfg.epochs, snapshot)

    if cfg.freeze_encoder:
        feats = np.concatenate(
            [cache.features(model.image_encoder, fp, s, pre, progress=progress) for s in sections]
        )
    try:
        history = fit(
            model,
            table,
            cfg,
            pre,
            features=feats,
            progress=progress,
            start=start,
            on_epoch=on_epoch,
        )
    except StateMismatch as exc:
        msg = f"{state.path if state else 'training state'}: {exc} (corrupt file?)"
        raise FormatError(msg) from exc
    except BaseException:
        if state is not None:
            state.wait(quiet=True)  # a state being written is finished, not torn
        raise
    if state is not None:
        state.wait()
    return history, table


def run_record(
    sections: Sequence[str],
    model,
    pre: PreprocessCfg,
    cfg: TrainCfg,
    **extra: Any,
) -> dict[str, Any]:
    """What a training run trains on, as a training state records it (``epochs`` aside)."""
    return {
        "sections": list(sections),
        "model": to_dict(model.cfg),
        "preprocess": to_dict(pre),
        "train": {k: v for k, v in to_dict(cfg).items() if k != "epochs"},
        **extra,
    }


def provenance(
    sections: Sequence[str], cfg: TrainCfg, history: Sequence[float], **extra: Any
) -> dict[str, Any]:
    from mclx import __version__

    return {
        "sections": list(sections),
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "train": {k: v for k, v in to_dict(cfg).items() if k != "extra"},
        "loss_history": [float(x) for x in history],
        "mclx_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
