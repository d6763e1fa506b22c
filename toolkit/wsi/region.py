"""Region models in the whole-slide runtime: predictions that need every tile at once.

Two kinds of checkpoint do not predict a tile from its own patch alone:

- a *context* model (trained with ``--context-radius R``, any model): each spot's frozen
  encoder features are replaced by their Gaussian-weighted mean over the spots within
  ``R`` µm (:mod:`mclx.training.context`) before the model's head;
- a *section* model (``histogene``, ``his2st``, ``thitogene``): one forward over all the
  spots of a section with their array coordinates (a Transformer / graph over them).

The runtime has every tile of the region (the spots, or the tissue grid), so both run
as one mechanism: the stream encodes each tile to its trunk features
(:meth:`TorchEncoder.features <mclx.inference.encoders.TorchEncoder.features>`: what the
head reads, before any standardisation), keeps them all on the host, then one *region
step* (:meth:`Region.outputs`) runs over all of them with their positions: for a context
model :func:`mclx.training.context.pool` (distances in µm: tile centres in level-0 px
times the slide's µm/px, as training's spot centres times the section's) then the head;
for a section model the head (``embed_image_features(features, positions)``, the
section forward that training and ``mclx evaluate`` use). Retrieval against the bank
(or the outputs themselves, for a model that predicts expression) follows as usual.

Only the checkpoint runs them (PyTorch): the exported graphs take single patches (a
context model cannot be exported) or a whole section's images at once (a section
model's ONNX), so an exported file or another backend is refused in one line. Nothing
is saved for ``--resume``: the region step needs every tile, so an interrupted run
starts again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mclx.errors import DataError


def model_config(model: Path) -> dict[str, Any]:
    """The model config (a dict) a checkpoint, ``.onnx`` or ``.engine`` records."""
    from mclx.checkpoint import read_checkpoint_dict
    from mclx.inference.encoders import read_onnx_metadata
    from mclx.inference.tensorrt import sidecar_path

    if model.suffix == ".pt":
        return dict(read_checkpoint_dict(model)["model"])
    if model.suffix == ".engine":
        return json.loads(json.loads(sidecar_path(model).read_text())["model"])
    return json.loads(read_onnx_metadata(model)["model"])


def config_or_empty(model: Path) -> dict[str, Any]:
    """:func:`model_config`, or {} when the file cannot be read: opening its encoder then
    reports what is wrong with it (empty, truncated, not exported by mclx) in its words."""
    try:
        return model_config(model)
    except Exception:  # noqa: BLE001 - reported by open_encoder with the file's problem
        return {}


def _radius(cfg: dict[str, Any]) -> float:
    return float(cfg.get("context_radius_um") or 0.0)


def region_kind(cfg: dict[str, Any]) -> str:
    """``section`` (a whole-section model, with or without a context radius),
    ``context`` (a context radius) or ``""`` (each tile on its own)."""
    if cfg.get("context") == "section":
        return "section"
    return "context" if _radius(cfg) > 0 else ""


def describe(cfg: dict[str, Any]) -> str:
    """``a his2st model`` / ``a knn model trained with --context-radius 400``."""
    name = cfg.get("name", "?")
    if _radius(cfg) > 0:
        return f"a {name} model trained with --context-radius {_radius(cfg):g}"
    return f"a {name} model"


def open_region_encoder(model: Path, cfg: dict, *, backend: str, precision: str, device: str):
    """The checkpoint's own model (:class:`~mclx.inference.encoders.TorchEncoder`) for
    a region model; an exported file, or a backend other than ``torch`` / ``auto``,
    refused in one line (``auto`` chooses torch, at fp32 unless a precision is named)."""
    from mclx.checkpoint import load_checkpoint
    from mclx.inference.device import torch_device
    from mclx.inference.encoders import TorchEncoder

    what = describe(cfg)
    if model.suffix != ".pt":
        ckpt = _recorded_checkpoint(model)
        msg = (
            f"{model}: {what} needs every tile of the region at once, which its exported "
            f"{model.suffix} graph does not take; mclx infer runs it from the checkpoint: "
            f"pass --model {ckpt}"
        )
        raise ValueError(msg)
    if backend not in ("auto", "torch"):
        msg = (
            f"{model}: {what} runs in mclx infer with --backend torch (auto chooses it), "
            f"not {backend}: its region step needs every tile at once"
        )
        raise ValueError(msg)
    ck = load_checkpoint(model)
    dev = str(torch_device(device))
    return TorchEncoder(ck, precision="fp32" if precision == "auto" else precision,
                        device=dev, region=True)  # fmt: skip


def _recorded_checkpoint(model: Path) -> str:
    """The checkpoint an exported file was made from (its metadata), else ``MODEL.pt``."""
    from contextlib import suppress

    from mclx.inference.encoders import read_onnx_metadata

    with suppress(Exception):
        if model.suffix == ".onnx":
            return read_onnx_metadata(model).get("checkpoint") or "MODEL.pt"
    return "the checkpoint (.pt) it was exported from"


@dataclass
class Region:
    """What the region step needs besides the features and the model's config (its
    radius, mode and views): with a context radius the tiles' centres in µm; for a
    section model the spots' array coordinates (a section model trained with a radius
    has both)."""

    xy_um: np.ndarray | None = None
    positions: np.ndarray | None = None

    def outputs(self, encoder, features: np.ndarray) -> np.ndarray:
        """The model's outputs (N, D) over the region's ``features`` (N, V F: each
        view's, V = 2 for a ``--context-fov`` model) joined as training joins them
        (:func:`mclx.training.context.join`: pooled over each tile's neighbourhood, or
        the neighbourhood appended), then the head, or the section forward with the
        positions (a section model)."""
        from mclx.inference.embed import head_outputs
        from mclx.training.context import join

        views = np.split(features, 1 + len(encoder.pre.views_um), axis=1)
        features = join(views, self.xy_um, encoder.model.cfg)
        return head_outputs(encoder.model, np.ascontiguousarray(features, np.float32),
                            positions=self.positions, device=encoder.device)  # fmt: skip


def plan_region(encoder, model: Path, where, tiles) -> Region | None:
    """The region of a run (None for a model that predicts each tile on its own),
    checked before a tile is read: µm/px for a context radius; for a section model the
    spots' array coordinates, inside the model's positional tables; the memory the
    kept features take."""
    cfg = encoder.model.cfg
    kind = region_kind({"context": cfg.context, "context_radius_um": cfg.context_radius_um})
    if not kind:
        return None
    region = Region()
    if kind == "section":
        region.positions = section_positions(encoder.model, model, where)
    if cfg.context_radius_um > 0:
        if not where.mpp:
            msg = f"{where.source}: the slide's µm/px is unknown, so {describe_model(cfg)}"
            raise DataError(msg + " has no scale: pass --mpp")
        region.xy_um = np.asarray(tiles.centres, np.float64) * float(where.mpp)
    _check_memory(encoder, model, where, len(tiles))
    return region


def describe_model(cfg) -> str:
    return describe({"name": cfg.name, "context": cfg.context,
                     "context_radius_um": cfg.context_radius_um})  # fmt: skip


def section_positions(net, model: Path, where) -> np.ndarray:
    """The spots' array coordinates (N, 2) int64, in the tiles' order: the spot file's
    (her2st ``x, y``; Visium ``array_col, array_row``: the columns training reads),
    refused without spots or beyond the positional tables the model was trained with."""
    what = describe_model(net.cfg)
    if where.spots is None:
        msg = f"{model}: {what} needs spot array coordinates: pass --spots FILE"
        raise DataError(msg)
    if "array_x" not in where.spots or "array_y" not in where.spots:
        msg = (
            f"{where.source}: no spot array coordinates (a CSV of x, y); {what} needs them: "
            "pass a her2st spot file, Visium tissue positions or a data folder"
        )
        raise DataError(msg)
    pos = where.spots[["array_x", "array_y"]].to_numpy(np.int64)
    tables = tuple(int(n) for n in net.cfg.pos_size)
    reads = getattr(net, "x_embed", None) is not None or hasattr(net, "check_positions")
    if reads and len(pos) and ((pos < 0).any() or (pos >= np.asarray(tables)).any()):
        msg = (
            f"{where.source}: spot array coordinates from ({pos[:, 0].min()}, "
            f"{pos[:, 1].min()}) to ({pos[:, 0].max()}, {pos[:, 1].max()}) lie outside the "
            f"positional tables {tables} that {model} ({what}) learned from its training data"
        )
        raise DataError(msg)
    return pos


def _check_memory(encoder, model: Path, where, n: int) -> None:
    """Refuse a region whose kept features (N x F float32, twice: the array and the
    pooled copy) would not fit in the memory available."""
    from mclx.models.backbones import feature_width
    from mclx.wsi.plan import check_memory

    dim = feature_width(encoder.model.cfg, encoder.model.image_encoder)
    need = 2 * n * dim * 4
    check_memory(need, where.source, f"{n:,} tiles x {dim} features of {model.name}, kept "
                 "for the region step")  # fmt: skip


def stream_region(
    slide, tiles, encoder, bank, region: Region, timings: dict[str, float], *,
    k: int | None = None,
    distance: str | None = None, batch_size: int = 64, workers: int = 2,
    reader_pool: str = "threads", retrieve_block: int = 4096, progress: bool = True,
) -> tuple[np.ndarray, dict[str, float]]:  # fmt: skip
    """Predictions (N, G) for every tile; seconds per stage added to ``timings``
    (``region``: the region step). Every tile's features are kept on the host until the
    last is encoded: N x F float32, 4 F bytes a tile (4 KiB for DenseNet-121's 1,024;
    his2st's and HisToGene's ``patch112`` crop is 3 x 112 x 112 values, 147 KiB a
    spot)."""
    from tqdm.auto import tqdm

    from mclx.inference import match, to_host
    from mclx.wsi.prefetch import prefetch

    for key in ("read", "wait", "encode", "region", "retrieve"):
        timings.setdefault(key, 0.0)
    parts: list[np.ndarray] = []
    batches = prefetch(slide, tiles, out=encoder.pre.patch_size, batch_size=batch_size,
                       workers=workers, pool=reader_pool)  # fmt: skip
    with tqdm(total=len(tiles), desc="infer", unit="tile", disable=not progress) as bar:
        for batch, read_s, wait_s in batches:
            timings["read"] += read_s
            timings["wait"] += wait_s
            t0 = time.perf_counter()
            parts.append(encoder.features(batch))
            timings["encode"] += time.perf_counter() - t0
            bar.update(len(batch))
    features = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    t0 = time.perf_counter()
    outputs = region.outputs(encoder, features)
    del features, parts
    timings["region"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    preds = np.concatenate(
        [to_host(match(outputs[s : s + retrieve_block], bank, k=k, distance=distance))
         for s in range(0, len(outputs), retrieve_block)]
        or [np.zeros((0, len(encoder.pre.genes)), np.float32)]
    )  # fmt: skip
    timings["retrieve"] += time.perf_counter() - t0
    return np.asarray(preds, np.float32), timings
