"""One engine for every whole-slide run: ``mclx infer`` on one slide, a local cohort,
and the writing of a Ray cohort's slides.

:class:`InferConfig` holds the run's options (documented once, here);
:class:`SlideTask` one slide and its outputs. :class:`SlideEngine` runs a task in stages,
each a method a variant may override (tiatoolbox's ``EngineABC``)::

    prepare (outputs checked, resumable state ready) -> open (the slide's header, where
    its tiles go) -> predict (plan, read, encode, match: :meth:`Run.infer
    <mclx.wsi.runtime.Run.infer>`) -> write (the .h5ad with the slide image, plots,
    GeoJSON, SpatialData: all or nothing)

The slide is opened once per task; the bank and encoder once per engine (:meth:`run`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class InferConfig:
    """The options of a whole-slide run, shared by all its slides.

    Attributes:
        bank: spot bank (.npz) from ``mclx bank build``; None for a model that predicts
            directly (ridge, stnet, the section models: give ``model``).
        model: checkpoint, .onnx or .engine (default: the bank's checkpoint, with the
            best artifact exported beside it).
        backend: encoder runtime, ``auto`` (the fastest exported one), ``torch``,
            ``onnxruntime``, ``tensorrt`` or ``openvino``.
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` or ``int8``.
        device: where the encoder and the bank run: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        k: neighbours retrieved (default: the bank's).
        distance: ``l1`` or ``l2`` of the inverse-square weights (default: the bank's).
        batch_size: tiles per encoder batch.
        stride: grid step in level-0 px (default: the tile size; smaller overlaps).
        workers: tile readers.
        reader_pool: readers as ``threads`` sharing the slide, or ``processes``.
        max_tiles: refuse a run of more tiles than this (default 2,000,000).
    """

    bank: Path | None = None
    model: Path | None = None
    backend: str = "auto"
    precision: str = "auto"
    device: str = "auto"
    k: int | None = None
    distance: str | None = None
    batch_size: int = 64
    stride: int | None = None
    workers: int = 2
    reader_pool: str = "threads"
    max_tiles: int | None = None

    def plan_options(self) -> dict[str, Any]:
        """What :meth:`Run.infer <mclx.wsi.runtime.Run.infer>` takes besides the slide."""
        return {"batch_size": self.batch_size, "stride": self.stride, "workers": self.workers,
                "reader_pool": self.reader_pool, "max_tiles": self.max_tiles}  # fmt: skip


@dataclass(frozen=True)
class SlideTask:
    """One slide of a run and what it writes: ``out`` (.h5ad), PNG maps of ``plot``
    beside it, ``geojson`` (its ``geojson_genes`` top genes), a ``spatialdata`` store,
    and with ``resume`` the predictions saved in ``OUT.state`` are continued."""

    slide: Path
    out: Path
    spots: Path | None = None
    mpp: float | None = None
    plot: tuple[str, ...] = ()
    geojson: Path | None = None
    geojson_genes: int | None = None
    spatialdata: Path | None = None
    resume: bool = False
    save_every: int | None = None

    def outputs(self):
        """The extra outputs (:class:`~mclx.wsi.outputs.Outputs`)."""
        from mclx.wsi.outputs import Outputs

        return Outputs(self.out, self.plot, self.geojson, self.geojson_genes, self.spatialdata)


@dataclass
class SlideEngine:
    """Runs :class:`SlideTask` s with one :class:`InferConfig`; ``label`` (``local``,
    ``ray``) is recorded as ``uns["mclx"]["engine"]`` when set; ``run_`` is the open bank
    and encoder (:class:`~mclx.wsi.runtime.Run`), opened at the first task if not given;
    ``log`` takes warnings; with ``make_folders`` a task's output folder may not exist yet
    (its parent must), as a cohort's out-dir."""

    config: InferConfig
    progress: bool = True
    label: str | None = None
    run_: Any = None
    log: Callable[[str], None] = field(default=_stderr, repr=False)  # warnings
    make_folders: bool = False  # a cohort's out-dir: created when its first slide is written

    def prepare(self, task: SlideTask):
        """Fail now when an output cannot be written; the resumable state, ready."""
        from mclx.files import check_output
        from mclx.run_state import ready_state, state_path
        from mclx.wsi.infer_state import SAVE_EVERY, InferState

        if self.make_folders and not task.out.parent.exists():
            check_output(task.out.parent, folder_ok=True)
        else:
            check_output(task.out)
        task.outputs().check()
        every = SAVE_EVERY if task.save_every is None else task.save_every
        state = InferState(state_path(task.out), every=every)
        return ready_state(state, task.out, task.resume, "predictions", self.log)

    def open_run(self, plot: tuple[str, ...] = ()):
        """The bank, model path and k checked (before a slide is opened)."""
        from mclx.wsi.runtime import check_inputs

        c = self.config
        return check_inputs(c.bank, c.model, plot, c.k)

    def open(self, task: SlideTask):
        """The slide and where its tiles go (its header and the spots only)."""
        from mclx.wsi.plan import locate

        slide, where = locate(task.slide, spots=task.spots, mpp=task.mpp)
        if where.note:
            self.log(where.note)
        return slide, where

    def predict(self, task: SlideTask, slide, where, state, t_start: float, checked=None):
        """Plan, read, encode and match: the predictions as AnnData."""
        from mclx.wsi.runtime import Run

        c = self.config
        if self.make_folders:  # the work starts: its folder holds the state it saves
            task.out.parent.mkdir(parents=True, exist_ok=True)
        if self.run_ is None:
            self.run_ = Run.open(c.bank, backend=c.backend, precision=c.precision,
                                 device=c.device, distance=c.distance, checked=checked)  # fmt: skip
        return self.run_.infer(task.slide, slide, where, state=state, progress=self.progress,
                               t_start=t_start, **c.plan_options())  # fmt: skip

    def write(self, adata, task: SlideTask, slide=None) -> list[Path]:
        """The predictions with the slide image (``slide``: the open one), and every
        other output, all or nothing; the paths of the extra outputs."""
        from mclx.files import all_or_nothing
        from mclx.run_state import remove_stale_temps
        from mclx.wsi.writer import add_spatial_image, write_predictions

        if self.label is not None:
            adata.uns["mclx"]["engine"] = self.label
        add_spatial_image(adata, task.slide, mpp=task.mpp, slide=slide)
        remove_stale_temps(task.out)
        task.out.parent.mkdir(parents=True, exist_ok=True)
        with all_or_nothing():  # the predictions and every other output, or nothing
            write_predictions(adata, task.out)
            return task.outputs().write(adata, task.slide, mpp=task.mpp)

    def run(self, task: SlideTask):
        """Every stage for one slide; (predictions, extra output paths)."""
        state = self.prepare(task)
        t_start = time.perf_counter()
        checked = self.open_run(task.plot) if self.run_ is None else None
        slide, where = self.open(task)  # bad slides and spots fail before a model loads
        try:
            adata = self.predict(task, slide, where, state, t_start, checked)
            extra = self.write(adata, task, slide)
            _warn_if_in_bank(getattr(self.run_, "bank", None), task.slide, slide)  # written
        finally:
            slide.close()
        state.remove()
        return adata, extra


def _warn_if_in_bank(bank, slide_path: Path, slide) -> None:
    """Warn when the slide is one of the bank's sections: its spots are in the bank,
    so the predictions are retrieved from its own measured expression."""
    if bank is None:
        return
    import warnings

    from mclx.bank_sections import slide_in_bank

    why = slide_in_bank(bank, slide_path, slide.path)
    if why:
        warnings.warn(
            f"{slide_path}: the bank {bank.path or ''} holds this slide's section ({why}): "
            "its predictions are retrieved from its own measured spots; build the bank "
            "without it (mclx bank build --sections) for a held-out prediction",
            stacklevel=2,
        )
