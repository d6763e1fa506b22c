"""Whole-slide inference: tiles -> prefetching readers -> encoder -> retrieval -> AnnData.

The stages, each a function: :func:`infer` checks the inputs (bank, model, genes, k)
before anything expensive, opens the slide and places tiles (a tissue grid, or given
spots) at the checkpoint's µm/px; :func:`stream` runs them through the inference layer
(:mod:`mclx.inference`: encoder, then :func:`~mclx.inference.match` against the bank)
while readers (:mod:`mclx.wsi.prefetch`) decode the next batches; :func:`predictions`
wraps the result as AnnData. Memory is bounded by the prefetch depth, one retrieval
block and the predictions themselves. A region model (a context radius, a section
model) keeps every tile's features for one step over all of them (:mod:`mclx.wsi.region`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mclx.wsi.plan import Where, make_plan, slide_record


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
    reader_pool: str = "threads",
    retrieve_block: int = 4096,
    state=None,
    progress: bool = True,
) -> tuple[np.ndarray, dict[str, float]]:
    """Predictions (N, G) for every tile, and seconds per stage. Embeddings stay on the
    encoder's device, matched against the bank ``retrieve_block`` tiles at a time; with
    ``state`` (:class:`~mclx.wsi.infer_state.InferState`) saves blocks, skips saved ones."""
    from tqdm.auto import tqdm

    from mclx.inference import match, to_host
    from mclx.wsi.prefetch import prefetch

    timings = {"read": 0.0, "wait": 0.0, "encode": 0.0, "retrieve": 0.0, "save": 0.0,
               **warm_up(encoder, bank)}  # fmt: skip
    preds = np.empty((len(tiles), len(encoder.pre.genes)), np.float32)
    done = state.start(preds) if state is not None else 0
    block = state.block(batch_size, retrieve_block) if state is not None else retrieve_block
    pending: list[Any] = []

    def flush() -> None:
        nonlocal done
        t0 = time.perf_counter()
        p = to_host(match(_concat(pending), bank, k=k, distance=distance))
        preds[done : done + len(p)] = p
        done += len(p)
        pending.clear()
        t1 = time.perf_counter()
        timings["retrieve"] += t1 - t0
        if state is not None and state.every and done < len(tiles):
            state.save(preds, done)
            timings["save"] += time.perf_counter() - t1

    batches = prefetch(
        slide, tiles, out=encoder.pre.patch_size, batch_size=batch_size, workers=workers,
        start=done, pool=reader_pool,
    )  # fmt: skip
    with tqdm(
        total=len(tiles), initial=done, desc="infer", unit="tile", disable=not progress
    ) as bar:
        for batch, read_s, wait_s in batches:
            timings["read"] += read_s
            timings["wait"] += wait_s
            pending.append(_timed(timings, "encode", encoder, batch))
            if sum(len(e) for e in pending) >= block:
                flush()
            bar.update(len(batch))
    if pending:
        flush()
    return preds, timings


def _timed(timings: dict[str, float], key: str, fn, *args):
    """``fn(*args)``, its seconds added to ``timings[key]``."""
    t0 = time.perf_counter()
    out = fn(*args)
    timings[key] += time.perf_counter() - t0
    return out


def warm_up(encoder, bank) -> dict[str, float]:
    """One-time work before the first tile, timed apart from the steady state:
    ``warmup``, the encoder's (bf16 on CPU: its frozen TorchScript model, traced or
    loaded from the cache), and ``compile``, the CPU retrieval kernels' (numba: compiled
    or loaded from its cache). Both are 0 when already done in this process."""
    t0 = time.perf_counter()
    prepare = getattr(encoder, "warm_up", None)
    if prepare is not None:
        prepare()
    out = {"warmup": time.perf_counter() - t0, "compile": 0.0}
    if bank is not None and _array_device(bank.embeddings) == "cpu":
        from mclx.kernels.warm import warm_up as compile_kernels

        out["compile"] = compile_kernels()
    return out


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


def check_inputs(bank_path, model, plot_genes: Sequence[str], k: int | None):
    """The bank, the model path (default: the bank's checkpoint) and k, checked before
    the slide is opened or a model loaded. Without a bank: (None, the model, 0), for a
    model that predicts expression directly (ridge, stnet, the section models)."""
    from mclx.bank import load_bank

    if bank_path is None:
        return None, _direct_model(model), 0
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
    from mclx.data.genenames import missing_hint, resolve_gene

    missing = [g for g in plot_genes if resolve_gene(g, bank.genes, bank.gene_ids) is None]
    if missing:
        msg = f"--plot: genes not in the bank {bank_path}: {', '.join(missing[:5])}" + missing_hint(
            bank.genes
        )
        raise KeyError(msg)
    return bank, model, bank.check_k(k)


def _direct_model(model) -> Path:
    """``model`` (checkpoint, .onnx or .engine) when its config says it predicts each
    tile's expression itself (no retrieval, ``k = 0``: ridge, stnet, the section models);
    else the error."""
    from mclx.wsi.region import model_config

    if not model:
        msg = "infer: pass --bank (from 'mclx bank build'), or --model for a model without one"
        raise ValueError(msg)
    model = Path(model)
    if not model.exists():
        msg = f"{model}: model (--model) does not exist"
        raise FileNotFoundError(msg)
    cfg = model_config(model)
    if cfg.get("k", 1):
        msg = f"{model}: a {cfg.get('name', '?')} model retrieves from a bank: pass --bank"
        raise ValueError(msg)
    return model


@dataclass
class Run:
    """What every slide of a run shares: the bank (placed where retrieval runs), the
    model path, the open encoder, k and the distance. ``mclx infer`` builds one for its
    slide; a cohort (:mod:`mclx.wsi.cohort`) one per process or Ray actor, for all slides."""

    bank_path: Path | None  # None: a model that predicts directly (ridge, stnet, his2st)
    bank: Any
    model: Path
    encoder: Any
    k: int
    distance: str | None = None
    region: str = ""  # "context" / "section": every tile at once (mclx.wsi.region)

    @classmethod
    def open(
        cls,
        bank_path: str | os.PathLike,
        *,
        model: str | os.PathLike | None = None,
        backend: str = "auto",
        precision: str = "auto",
        device: str = "auto",
        k: int | None = None,
        distance: str | None = None,
        plot_genes: Sequence[str] = (),
        checked=None,
    ) -> Run:
        """Load the bank and the encoder and check that they belong together;
        ``checked``: the result of :func:`check_inputs` when already called."""
        from mclx.inference import open_encoder
        from mclx.wsi.region import config_or_empty, open_region_encoder, region_kind

        bank, model, k = checked or check_inputs(bank_path, model, plot_genes, k)
        model = Path(model)
        cfg = config_or_empty(model)
        region = region_kind(cfg)
        if region:
            encoder = open_region_encoder(model, cfg, backend=backend, precision=precision,
                                          device=device)  # fmt: skip
        else:
            encoder = open_encoder(model, backend=backend, precision=precision, device=device)
        if bank is not None:
            bank.check_compatible(encoder.fingerprint, encoder.pre.genes)
            bank = place_bank(bank, encoder, device)
        bank_path = Path(bank_path) if bank_path is not None else None
        return cls(bank_path, bank, model, encoder, k, distance, region)

    def plan(self, slide, where: Where, source, **kw: Any):
        """The slide's :class:`~mclx.wsi.plan.Plan` at this run's µm/px."""
        return make_plan(slide, where, self.encoder.pre, n_genes=len(self.encoder.pre.genes),
                    source=source, **kw)  # fmt: skip

    def predict(self, patches):
        """Predictions (N, G) on the host for a batch of uint8 patches: the encoder, then
        retrieval against the bank (the steps :func:`stream` runs block by block)."""
        from mclx.inference import match, to_host

        self.require_batchwise("a batch of patches", "mclx infer on a slide")
        emb = self.encoder(patches)
        return to_host(match(emb, self.bank, k=self.k, distance=self.distance))

    def require_batchwise(self, what: str, instead: str) -> None:
        """Refuse, in one line, a region model (:mod:`mclx.wsi.region`) where tiles are
        predicted batch by batch (``what``), naming what runs it (``instead``)."""
        if self.region:
            from mclx.wsi.region import describe, model_config

            msg = (
                f"{self.model}: {describe(model_config(self.model))} predicts every tile of "
                f"a region at once, not {what}: use {instead}"
            )
            raise ValueError(msg)

    def provenance(self, slide_info: dict, *, resumed_from: int = 0) -> dict:
        """``uns["mclx"]`` of a slide: its ``slide_info`` (:func:`slide_record`), then
        the bank, model and retrieval settings."""
        bank = self.bank
        return {
            **slide_info,
            "bank": str(self.bank_path.resolve()) if bank is not None else "",
            "model": str(self.model.resolve()),
            "k": int(self.k),
            "distance": (self.distance or bank.distance) if bank is not None else "",
            "bank_device": _array_device(bank.embeddings) if bank is not None else "",
            "resumed_from_tile": int(resumed_from),
        }

    def infer(
        self,
        slide_path,
        slide,
        where: Where,
        *,
        batch_size: int = 64,
        workers: int = 2,
        reader_pool: str = "threads",
        state=None,
        progress: bool = True,
        t_start=None,
        **plan_kw,
    ):
        """AnnData of the predictions over an open ``slide`` (tiles placed by ``where``)."""
        from mclx.wsi.prefetch import pool_for

        t_start = time.perf_counter() if t_start is None else t_start
        work = self.plan(slide, where, str(slide_path), batch_size=batch_size, workers=workers,
                         **plan_kw)  # fmt: skip
        if state is not None:
            state.record = _run_record(slide_path, work.tiles, self.encoder, self.bank, self.k,
                                       self.distance, batch_size, state.every)  # fmt: skip
        opts = dict(k=self.k, distance=self.distance, batch_size=batch_size, workers=workers,
                    reader_pool=reader_pool, progress=progress)  # fmt: skip
        if self.region:
            preds, timings = self._region(slide, where, work.tiles, state, opts)
        else:
            preds, timings = stream(slide, work.tiles, self.encoder, self.bank, state=state,
                                    **opts)  # fmt: skip
        timings["total"] = time.perf_counter() - t_start
        resumed = int(state.saved[0]) if state is not None and state.saved else 0
        resumed = 0 if self.region else resumed  # the region step redid every tile
        info = slide_record(slide_path, slide, where, work)
        info.update(reader_pool=pool_for(slide, reader_pool), readers=int(workers))
        prov = self.provenance(info, resumed_from=resumed)
        return predictions(preds, work.tiles, self.bank, self.encoder, prov, timings)

    def _region(self, slide, where: Where, tiles, state, opts: dict):
        """:func:`~mclx.wsi.region.stream_region` (checked first: positions, scale,
        memory); a state saved by another run is refused, none is saved (a region model
        needs every tile, so an interrupted run starts again)."""
        from mclx.wsi.region import plan_region, stream_region

        region = plan_region(self.encoder, self.model, where, tiles)
        if state is not None and state.saved is not None:
            state.start(np.empty((len(tiles), len(self.encoder.pre.genes)), np.float32))
        timings = warm_up(self.encoder, self.bank)
        return stream_region(slide, tiles, self.encoder, self.bank, region, timings, **opts)


def _run_record(slide_path, tiles, encoder, bank, k, distance, batch_size, every) -> dict:
    """What a resumed run must find unchanged (see :mod:`mclx.wsi.infer_state`)."""
    from mclx.wsi.infer_state import file_record, tiles_digest

    return {
        "slide": file_record(slide_path),
        "tiles": {"n": len(tiles), "digest": tiles_digest(tiles)},
        "checkpoint_fingerprint": encoder.fingerprint,
        "backend": [encoder.name, encoder.precision, encoder.device],
        "bank_fingerprint": bank.fingerprint if bank is not None else "",
        "bank": file_record(bank.path) if bank is not None else None,
        "k": int(k),
        "distance": (distance or bank.distance) if bank is not None else "",
        "batch_size": int(batch_size),
        "save_every": int(every),
    }


def predictions(preds: np.ndarray, tiles, bank, encoder, provenance: dict, timings: dict):
    """AnnData of the predictions: one observation per tile, ``obsm["spatial"]`` the
    tile centres (level-0 pixels), ``uns["mclx"]`` the provenance and timings."""
    import anndata as ad  # after the work: a bad input fails without importing it
    import pandas as pd

    from mclx import __version__

    obs = pd.DataFrame(
        {"x": tiles.centres[:, 0], "y": tiles.centres[:, 1]}, index=pd.Index(tiles.ids, dtype=str)
    )
    genes = list(encoder.pre.genes)
    adata = ad.AnnData(X=preds, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    if bank is not None and len(bank.gene_ids) == len(genes):
        adata.var["gene_ids"] = list(bank.gene_ids)
    adata.obsm["spatial"] = tiles.centres.copy()
    adata.uns["mclx"] = {
        "mclx_version": __version__,
        **provenance,
        "patch_size": encoder.pre.patch_size,
        "checkpoint_fingerprint": encoder.fingerprint,
        "bank_fingerprint": bank.fingerprint if bank is not None else "",
        "backend": encoder.name,
        "precision": encoder.precision,
        "device": encoder.device,
        "weighting": bank.weighting if bank is not None else "",
        "timings": {key: float(v) for key, v in timings.items()},
    }
    parity = parity_record(encoder)
    if parity:
        adata.uns["mclx"]["parity"] = parity
    return adata


def parity_record(encoder) -> dict:
    """The export's parity record of the format ``--backend auto`` chose (its name, the
    gate, whether it held, the task's numbers, the cosine): plain values only, as an
    ``.h5ad`` stores them. Empty for a backend named on the command line."""
    rec = getattr(encoder, "parity", None) or {}
    keys = ("format", "gate", "held", "min_cosine", "rate")
    out = {k: rec[k] for k in keys if rec.get(k) is not None}
    task = rec.get("task") or {}
    keys = ("topk_overlap", "gene_corr_median", "pcc_acg", "pcc_acg_fp32", "spots")
    out.update({k: task[k] for k in keys if task.get(k) is not None})
    return out
