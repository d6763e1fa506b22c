"""Sections (AnnData) -> one table of model-ready arrays for training and banks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mclx.config import PreprocessCfg
from mclx.data.preprocess import normalize_expression, raw_counts


@dataclass
class SpotTable:
    """Spots of several sections, row-aligned.

    Attributes:
        expr: (N, G) float32 preprocessed expression.
        pos: (N, 2) int64 array coordinates (x, y).
        coords: (N, 2) float64 pixel coordinates (x, y).
        section: (N,) section name of each spot.
        obs_names: (N,) spot ids ``"{section}_{x}x{y}"``.
        patches: (N, S, S, 3) uint8 patches, or None when not cut.
        counts: (N, G) float32 raw counts over the genes, or None when not asked for
            (His2ST's ZINB term reads them in training).
    """

    expr: np.ndarray
    pos: np.ndarray
    coords: np.ndarray
    section: np.ndarray
    obs_names: np.ndarray
    patches: np.ndarray | None = None
    counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.expr)

    @property
    def sections(self) -> list[str]:
        """Section names in order of first appearance."""
        return list(dict.fromkeys(self.section.tolist()))

    def rows(self, section: str) -> np.ndarray:
        return np.flatnonzero(self.section == section)


def build_table(
    adatas: Mapping[str, object], pre: PreprocessCfg, *, counts: bool = False
) -> SpotTable:
    """Preprocess every section with ``pre`` and concatenate (patches are cut separately,
    :class:`mclx.training.features.PatchCache`); with ``counts``, keep the raw counts too."""
    parts = []
    for name, a in adatas.items():
        parts.append(
            SpotTable(
                expr=normalize_expression(a, pre),
                pos=a.obs[["x", "y"]].to_numpy(np.int64),
                coords=np.asarray(a.obsm["spatial"], np.float64),
                section=np.full(a.n_obs, name, dtype=object),
                obs_names=np.asarray(a.obs_names, dtype=object),
            )
        )
    raw = [raw_counts(a, pre.genes) for a in adatas.values()] if counts else None
    return SpotTable(
        counts=np.concatenate(raw) if raw else None,
        expr=np.concatenate([p.expr for p in parts]),
        pos=np.concatenate([p.pos for p in parts]),
        coords=np.concatenate([p.coords for p in parts]),
        section=np.concatenate([p.section for p in parts]),
        obs_names=np.concatenate([p.obs_names for p in parts]),
    )
