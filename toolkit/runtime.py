"""Whole-slide inference: tiles -> prefetching readers -> encoder -> retrieval -> AnnData.

Reader threads decode batch i+1 while the encoder runs batch i; embeddings are matched
against the bank in blocks of ``retrieve_block`` tiles on the bank's device. Memory is
bounded by the prefetch depth, one retrieval block and the predictions themselves.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mclx.errors import DataError

MPP_TOLERANCE = 0.02  # slides within 2% of the training µm/px are read without resampling


def open_encoder(model: str | os.PathLike, *, backend: str, precision: str, device: str):
    """A checkpoint (best backend beside it) or an exported artifact (.onnx / .engine)."""
    from mclx.export.backends import OnnxRuntimeBackend, create_backend

    path = Path(model)
    if path.suffix == ".onnx":
        return OnnxRuntimeBackend(path, device="cuda" if device == "cuda" else "cpu")
    if path.suffix == ".engine":
        from mclx.export.tensorrt_build import TensorRTBackend

        return TensorRTBackend(path)
    return create_backend(path, backend=backend, precision=precision, device=device)


def _gpu_for(model: Path) -> bool:
    """Whether ``--device auto`` means CUDA for this model. An ONNX file on a CPU build
    of ONNX Runtime runs on the CPU: no need to import torch to ask about CUDA."""
    from mclx.export.backends import cuda_available

    if model.suffix == ".onnx":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False
    return cuda_available()


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


def stream(
    slide,
    tiles,
    encoder,
    bank,
    *,
    k: int,
    distance: str,
    weighting: str,
    batch_size: int = 64,
    workers: int = 2,
    retrieve_block: int = 4096,
    progress: bool = True,
) -> tuple[np.ndarray, dict[str, float]]:
    """Predictions (N, G) for every tile, and seconds spent per stage."""
    from tqdm.auto import tqdm

    from mclx.kernels import retrieve

    out = encoder.pre.patch_size
    timings = {"read": 0.0, "wait": 0.0, "encode": 0.0, "retrieve": 0.0}
    preds = np.empty((len(tiles), len(bank.genes)), np.float32)
    pending: list[Any] = []
    done = 0

    def flush() -> None:
        nonlocal done, pending
        if not pending:
            return
        t0 = time.perf_counter()
        q = pending[0] if len(pending) == 1 else _concat(pending)
        p = retrieve(
            q, bank.embeddings, bank.expressions, k, distance=distance, weighting=weighting
        )
        p = p.get() if hasattr(p, "get") else p  # CuPy -> host
        preds[done : done + len(p)] = p
        done += len(p)
        pending = []
        timings["retrieve"] += time.perf_counter() - t0

    starts = range(0, len(tiles), batch_size)
    bar = tqdm(total=len(tiles), desc="infer", unit="tile", disable=not progress)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        queue: deque = deque()
        it = iter(starts)
        for s in it:  # keep `workers + 1` batches in flight
            queue.append(
                pool.submit(
                    _read_batch, slide, tiles, range(s, min(s + batch_size, len(tiles))), out
                )
            )
            if len(queue) > workers:
                break
        while queue:
            t0 = time.perf_counter()
            batch, read_s = queue.popleft().result()
            timings["wait"] += time.perf_counter() - t0
            timings["read"] += read_s
            nxt = next(it, None)
            if nxt is not None:
                queue.append(
                    pool.submit(
                        _read_batch,
                        slide,
                        tiles,
                        range(nxt, min(nxt + batch_size, len(tiles))),
                        out,
                    )
                )
            t0 = time.perf_counter()
            emb = encoder(batch)
            timings["encode"] += time.perf_counter() - t0
            pending.append(emb)
            if sum(len(e) for e in pending) >= retrieve_block:
                flush()
            bar.update(len(batch))
    flush()
    bar.close()
    return preds, timings


def _concat(parts):
    import sys

    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(parts[0], cp.ndarray):
        return cp.concatenate(parts)
    return np.concatenate(parts)


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
    from mclx import __version__
    from mclx.bank import load_bank
    from mclx.slide import open_slide
    from mclx.tiling import grid_tiles, read_spots, slide_tissue, spot_mpp, spot_tiles

    t_start = time.perf_counter()
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
    k = k or bank.k
    if k > len(bank):
        msg = f"{bank_path}: k={k} is larger than the bank ({len(bank)} spots)"
        raise ValueError(msg)
    # slide and spots before the encoder: a bad input fails before a model is loaded
    slide = open_slide(slide_path, mpp=mpp)
    try:
        spot_df = kind = None
        slide_mpp = slide.mpp
        tissue = None
        if spots is not None:
            spot_df, kind = read_spots(spots)
            slide_mpp = slide_mpp or spot_mpp(spot_df, kind)
        else:
            tissue = slide_tissue(slide)
        if device == "auto":
            device = "cuda" if _gpu_for(model) else "cpu"
        encoder = open_encoder(model, backend=backend, precision=precision, device=device)
        bank.check_compatible(encoder.fingerprint, encoder.pre.genes)
        if device == "cuda":
            bank = bank.to_device("cuda")
        size = tile_size(encoder.pre, slide_mpp, str(slide_path))
        if spot_df is not None:
            tiles = spot_tiles(slide, spot_df, size=size, source=str(spots))
        else:
            tiles = grid_tiles(slide, size=size, stride=stride, tissue=tissue)
        preds, timings = stream(
            slide,
            tiles,
            encoder,
            bank,
            k=k,
            distance=distance or bank.distance,
            weighting=bank.weighting,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
        )
    finally:
        slide.close()
    import anndata as ad  # after the work: a bad input fails without importing it
    import pandas as pd

    obs = pd.DataFrame(
        {"x": tiles.centres[:, 0], "y": tiles.centres[:, 1]}, index=pd.Index(tiles.ids, dtype=str)
    )
    adata = ad.AnnData(X=preds, obs=obs, var=pd.DataFrame(index=pd.Index(bank.genes, dtype=str)))
    adata.obsm["spatial"] = tiles.centres.copy()
    timings["total"] = time.perf_counter() - t_start
    adata.uns["mclx"] = {
        "mclx_version": __version__,
        "slide": str(Path(slide_path).resolve()),
        "slide_reader": slide.backend,
        "slide_mpp": slide_mpp or -1.0,
        "tile_size_level0": int(size),
        "patch_size": encoder.pre.patch_size,
        "checkpoint_fingerprint": encoder.fingerprint,
        "bank_fingerprint": bank.fingerprint,
        "bank": str(Path(bank_path).resolve()),
        "model": str(model.resolve()),
        "backend": encoder.name,
        "precision": encoder.precision,
        "device": device,
        "k": int(k),
        "distance": distance or bank.distance,
        "weighting": bank.weighting,
        "tiles_from": f"spots:{kind}" if spot_df is not None else "tissue grid",
        "timings": {key: float(v) for key, v in timings.items()},
    }
    return adata
