"""Whole-slide inference: tiles -> prefetching readers -> encoder -> retrieval -> AnnData.

The stages, each a function: :func:`infer` checks the inputs (bank, model, genes, k)
before anything expensive, opens the slide and places tiles (a tissue grid, or given
spots) at the checkpoint's µm/px; :func:`stream` runs them through the inference layer
(:mod:`mclx.inference`: encoder, then :func:`~mclx.inference.match` against the bank)
while reader threads decode the next batches; :func:`predictions` wraps the result as
AnnData. Memory is bounded by the prefetch depth, one retrieval block and the
predictions themselves.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mclx.errors import DataError

MPP_TOLERANCE = 0.02  # slides within 2% of the training µm/px are read without resampling


def tile_size(pre, slide_mpp: float | None, source: str) -> int:
    """Level-0 pixels per tile so that tiles match the checkpoint's µm/px."""
    if pre.mpp is None or slide_mpp is None:
        if pre.mpp is not None:
            msg = f"{source}: µm/px unknown (no metadata, no spot grid); pass --mpp"
            raise DataError(msg)
        return pre.patch_size
    ratio = pre.mpp / slide_mpp
    if abs(ratio - 1) <= MPP_TOLERANCE:
        return pre.patch_size
    return max(1, round(pre.patch_size * ratio))


def _read_batch(slide, tiles, idx: range, out: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    batch = np.stack([slide.read(*tiles.origin(i), tiles.size, out) for i in idx])
    return batch, time.perf_counter() - t0


def prefetch(
    slide, tiles, *, out: int, batch_size: int, workers: int
) -> Iterator[tuple[np.ndarray, float, float]]:
    """Batches of uint8 patches in tile order, read by ``workers`` threads that keep
    ``workers + 1`` batches in flight; yields (batch, read seconds, wait seconds)."""
    batches = (range(s, min(s + batch_size, len(tiles))) for s in range(0, len(tiles), batch_size))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        queue: deque = deque()
        for idx in batches:
            queue.append(pool.submit(_read_batch, slide, tiles, idx, out))
            if len(queue) > workers:
                break
        while queue:
            t0 = time.perf_counter()
            batch, read_s = queue.popleft().result()
            wait_s = time.perf_counter() - t0
            idx = next(batches, None)
            if idx is not None:
                queue.append(pool.submit(_read_batch, slide, tiles, idx, out))
            yield batch, read_s, wait_s


def stream(
    slide,
    tiles,
    encoder,
    bank,
    *,
    k: int | None = None,
    distance: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    retrieve_block: int = 4096,
    progress: bool = True,
) -> tuple[np.ndarray, dict[str, float]]:
    """Predictions (N, G) for every tile, and seconds spent per stage.

    Embeddings stay on the encoder's device and are matched against the bank (same
    device) in blocks of ``retrieve_block`` tiles.
    """
    from tqdm.auto import tqdm

    from mclx.inference import match, to_host

    timings = {"read": 0.0, "wait": 0.0, "encode": 0.0, "retrieve": 0.0}
    preds = np.empty((len(tiles), len(bank.genes)), np.float32)
    pending: list[Any] = []
    done = 0

    def flush() -> None:
        nonlocal done
        t0 = time.perf_counter()
        p = to_host(match(_concat(pending), bank, k=k, distance=distance))
        preds[done : done + len(p)] = p
        done += len(p)
        pending.clear()
        timings["retrieve"] += time.perf_counter() - t0

    batches = prefetch(
        slide, tiles, out=encoder.pre.patch_size, batch_size=batch_size, workers=workers
    )
    with tqdm(total=len(tiles), desc="infer", unit="tile", disable=not progress) as bar:
        for batch, read_s, wait_s in batches:
            timings["read"] += read_s
            timings["wait"] += wait_s
            t0 = time.perf_counter()
            pending.append(encoder(batch))
            timings["encode"] += time.perf_counter() - t0
            if sum(len(e) for e in pending) >= retrieve_block:
                flush()
            bar.update(len(batch))
    if pending:
        flush()
    return preds, timings


def _concat(parts):
    if len(parts) == 1:
        return parts[0]
    kind = type(parts[0]).__module__
    if kind.startswith("cupy"):
        import cupy as cp

        return cp.concatenate(parts)
    if kind.startswith("torch"):
        import torch

        return torch.cat(parts)
    return np.concatenate(parts)


def place_bank(bank, encoder, device: str):
    """The bank where retrieval runs: in the memory of the encoder's GPU, unless
    ``--device cpu`` asked for the host (an engine still encodes on its GPU; its CuPy
    embeddings are then matched on the CPU)."""
    if encoder.device.startswith("cuda") and device != "cpu":
        return bank.to_device(encoder.device)
    return bank


def _array_device(array) -> str:
    """``cpu`` for host arrays, ``cuda:N`` for CuPy arrays and CUDA tensors."""
    if type(array).__module__.startswith("cupy"):
        return f"cuda:{array.device.id}"
    return str(getattr(array, "device", "cpu"))


def _check_inputs(bank_path, model, plot_genes: Sequence[str], k: int | None):
    """The bank, the model path (default: the bank's checkpoint) and k, checked before
    the slide is opened or a model loaded."""
    from mclx.bank import load_bank

    bank = load_bank(bank_path)
    if model:
        model = Path(model)
        if not model.exists():
            msg = f"{model}: model (--model) does not exist"
            raise FileNotFoundError(msg)
    else:
        model = Path(bank.checkpoint)
        if not model.is_file():
            msg = f"{bank_path}: the bank's checkpoint {model} does not exist; pass --model"
            raise FileNotFoundError(msg)
    missing = [g for g in plot_genes if g not in bank.genes]
    if missing:
        msg = f"--plot: genes not in the bank {bank_path}: {', '.join(missing[:5])}"
        raise KeyError(msg)
    return bank, model, bank.check_k(k)


@dataclass
class _Where:
    """Where the tiles go, known before a model is loaded: given spots (and the µm/px
    their grid implies) or the slide's tissue mask."""

    spots: Any = None
    kind: str = ""
    mpp: float | None = None
    tissue: Any = None

    @classmethod
    def find(cls, slide, spots) -> _Where:
        from mclx.tiling import read_spots, slide_tissue, spot_mpp

        if spots is None:
            return cls(mpp=slide.mpp, tissue=slide_tissue(slide))
        spot_df, kind = read_spots(spots)
        return cls(spot_df, kind, slide.mpp or spot_mpp(spot_df, kind))

    @property
    def origin(self) -> str:
        return f"spots:{self.kind}" if self.spots is not None else "tissue grid"

    def tiles(self, slide, *, size: int, stride: int | None, source: str):
        from mclx.tiling import grid_tiles, spot_tiles

        if self.spots is None:
            return grid_tiles(slide, size=size, stride=stride, tissue=self.tissue)
        return spot_tiles(slide, self.spots, size=size, source=source)


def infer(
    slide_path: str | os.PathLike,
    *,
    bank_path: str | os.PathLike,
    model: str | os.PathLike | None = None,
    backend: str = "auto",
    precision: str = "auto",
    device: str = "auto",
    spots: str | os.PathLike | None = None,
    k: int | None = None,
    distance: str | None = None,
    batch_size: int = 64,
    stride: int | None = None,
    mpp: float | None = None,
    workers: int = 2,
    plot_genes: Sequence[str] = (),
    progress: bool = True,
):
    """Predict expression over a slide (tissue grid or ``spots``); return AnnData.

    ``plot_genes`` are only checked against the bank's genes, before any tile is read.
    """
    from mclx.inference import open_encoder
    from mclx.slide import open_slide

    t_start = time.perf_counter()
    bank, model, k = _check_inputs(bank_path, model, plot_genes, k)
    # the slide and spots before the encoder: a bad input fails before a model is loaded
    slide = open_slide(slide_path, mpp=mpp)
    try:
        where = _Where.find(slide, spots)
        encoder = open_encoder(model, backend=backend, precision=precision, device=device)
        bank.check_compatible(encoder.fingerprint, encoder.pre.genes)
        bank = place_bank(bank, encoder, device)
        size = tile_size(encoder.pre, where.mpp, str(slide_path))
        tiles = where.tiles(slide, size=size, stride=stride, source=str(spots))
        preds, timings = stream(
            slide, tiles, encoder, bank, k=k, distance=distance, batch_size=batch_size,
            workers=workers, progress=progress,
        )  # fmt: skip
    finally:
        slide.close()
    timings["total"] = time.perf_counter() - t_start
    provenance = {
        "slide": str(Path(slide_path).resolve()),
        "slide_reader": slide.backend,
        "slide_mpp": where.mpp or -1.0,
        "tile_size_level0": int(tiles.size),
        "bank": str(Path(bank_path).resolve()),
        "model": str(model.resolve()),
        "k": int(k),
        "distance": distance or bank.distance,
        "tiles_from": where.origin,
        "bank_device": _array_device(bank.embeddings),
    }
    return predictions(preds, tiles, bank, encoder, provenance, timings)


def predictions(preds: np.ndarray, tiles, bank, encoder, provenance: dict, timings: dict):
    """AnnData of the predictions: one observation per tile, ``obsm["spatial"]`` the
    tile centres (level-0 pixels), ``uns["mclx"]`` the provenance and timings."""
    import anndata as ad  # after the work: a bad input fails without importing it
    import pandas as pd

    from mclx import __version__

    obs = pd.DataFrame(
        {"x": tiles.centres[:, 0], "y": tiles.centres[:, 1]}, index=pd.Index(tiles.ids, dtype=str)
    )
    adata = ad.AnnData(X=preds, obs=obs, var=pd.DataFrame(index=pd.Index(bank.genes, dtype=str)))
    adata.obsm["spatial"] = tiles.centres.copy()
    adata.uns["mclx"] = {
        "mclx_version": __version__,
        **provenance,
        "patch_size": encoder.pre.patch_size,
        "checkpoint_fingerprint": encoder.fingerprint,
        "bank_fingerprint": bank.fingerprint,
        "backend": encoder.name,
        "precision": encoder.precision,
        "device": encoder.device,
        "weighting": bank.weighting,
        "timings": {key: float(v) for key, v in timings.items()},
    }
    return adata
