"""The ``ray`` engine of :mod:`mclx.wsi.cohort`: slides through Ray Data.

1. Plan: one Ray task per slide opens it, places its tiles (:func:`mclx.wsi.plan.plan`:
   tissue grid or spots, µm/px, refusals) and returns them; a slide that fails here is
   reported and left out.
2. Read: ``flat_map`` on CPU tasks (``--readers`` slides at once) turns each slide into one
   row per tile, read by the runtime's prefetching reader threads (:func:`~mclx.wsi.runtime.
   prefetch`); a slide whose body cannot be read yields one error row instead.
3. Predict: ``map_batches`` over an actor pool (``ActorPoolStrategy``, ``num_gpus`` per actor
   on GPU clusters, an explicit ``batch_size``) whose actors open the encoder and the bank
   once (:class:`mclx.wsi.runtime.Run`) and run encoder + retrieval.
4. Regroup: the driver streams the predictions back, fills each slide's array by tile
   index and, once all of a slide's tiles are in, writes its ``.h5ad`` atomically (as
   ``mclx infer`` does); memory holds the slides in flight only.

Ray runs on this machine (``ray.init()``, the embedded default) unless an address is given
(``--address`` or ``RAY_ADDRESS``); an already initialised Ray (a test's) is used as is.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mclx.errors import MclxError
from mclx.wsi.cohort_jobs import (
    SLIDE_ERRORS,
    Job,
    Options,
    Result,
    failure,
    progress_line,
    write_slide,
)

EXTRA = "mclx[ray]"


def require_ray() -> None:
    """Fail in one line naming the extra when Ray (with Ray Data) is not installed."""
    from mclx.extras import require

    msg = f"--engine ray needs Ray Data, which is not installed: pip install '{EXTRA}'"
    require("ray", "ray.data", message=msg)


def connect(address: str | None) -> bool:
    """Ray, started here or joined (``address``, else ``RAY_ADDRESS``, else a new local
    instance); True when this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
    # a Ray started here: quiet, no dashboard; a cluster's settings are its own
    local = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        ray.init(address=address, **({} if address else local))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200]
        msg = f"cannot connect to the Ray cluster at {address or 'this machine'}: {detail}"
        raise MclxError(msg) from exc
    return True


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail in one line, within ``timeout`` seconds, when nothing answers at a
    ``[ray://]HOST:PORT`` address (Ray itself retries for minutes)."""
    import socket

    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" or another form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        msg = f"cannot reach the Ray cluster at {address} (--address / RAY_ADDRESS): {exc}"
        raise MclxError(msg) from exc


def plan_task(job: Job, pre, n_genes: int, plan_kw: dict[str, Any], pool: str) -> dict[str, Any]:
    """Step 1 for one slide (a Ray task): its tiles and provenance, or its error."""
    from mclx.wsi.plan import locate, make_plan, slide_record
    from mclx.wsi.prefetch import pool_for

    t0 = time.perf_counter()
    try:
        slide, where = locate(job.slide, spots=job.spots, mpp=job.mpp)
        try:
            work = make_plan(slide, where, pre, n_genes=n_genes, source=str(job.slide), **plan_kw)
            info = slide_record(job.slide, slide, where, work)
            info.update(reader_pool=pool_for(slide, pool), readers=int(plan_kw["workers"]))
        finally:
            slide.close()
    except SLIDE_ERRORS as exc:
        return {"error": failure(job, exc).error, "seconds": time.perf_counter() - t0}
    return {"tiles": work.tiles, "info": info, "seconds": time.perf_counter() - t0}


def read_tiles(row: dict[str, Any], *, jobs, tiles, patch_size: int, batch_size: int,
               workers: int, reader_pool: str = "threads"):  # fmt: skip
    """Step 2 for one slide (``flat_map``): a row per tile, or one error row."""
    from mclx.data.slide import open_slide
    from mclx.wsi.prefetch import prefetch

    i = int(row["job"])
    job, t = jobs[i], tiles[i]
    done = 0
    try:
        slide = open_slide(job.slide, mpp=job.mpp)
        try:
            batches = prefetch(slide, t, out=patch_size, batch_size=batch_size, workers=workers,
                               pool=reader_pool)  # fmt: skip
            for batch, _, _ in batches:
                for patch in batch:
                    yield {"job": i, "tile": done, "patch": patch, "error": ""}
                    done += 1
        finally:
            slide.close()
    except SLIDE_ERRORS as exc:
        blank = np.zeros((patch_size, patch_size, 3 * (1 + len(t.views))), np.uint8)
        yield {"job": i, "tile": -1, "patch": blank, "error": failure(job, exc).error}


class Predictor:
    """Step 3 (an actor of the pool): the encoder and the bank, opened once."""

    def __init__(self, bank_path: str, encoder_args: dict[str, Any], k: int, distance) -> None:
        from mclx.wsi.runtime import Run

        self.run = Run.open(bank_path, k=k, distance=distance, **encoder_args)
        self.n_genes = len(self.run.bank.genes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([not e for e in batch["error"]], bool)
        preds = np.zeros((len(ok), self.n_genes), np.float32)
        if ok.any():
            preds[ok] = self.run.predict(np.ascontiguousarray(batch["patch"][ok]))
        return {"job": batch["job"], "tile": batch["tile"], "pred": preds, "error": batch["error"]}


def _actor_count(actors: int | None, gpus_per_worker: float) -> int:
    """``actors``, else one per ``gpus_per_worker`` GPUs of the cluster, else one."""
    import ray

    if actors:
        return actors
    if gpus_per_worker:
        return max(1, int(ray.cluster_resources().get("GPU", 0) // gpus_per_worker))
    return 1


def run_ray(  # long: the engine's options, documented in the CLI
    jobs: Sequence[Job],
    run,
    opts: Options,
    *,
    encoder_args: dict[str, Any],
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    readers: int | None = None,
    actors: int | None = None,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Predict ``jobs`` on Ray Data; their summary rows in order."""
    import ray

    started = connect(address)
    try:
        return _Cohort(jobs, run, opts, log).execute(
            encoder_args, gpus_per_worker=gpus_per_worker, readers=readers,
            actors=_actor_count(actors, gpus_per_worker),
        )  # fmt: skip
    finally:
        if started:
            ray.shutdown()


class _Cohort:
    """One Ray run over ``jobs``: plans, the dataset, and the driver's regrouping."""

    def __init__(self, jobs: Sequence[Job], run, opts: Options, log) -> None:
        self.jobs, self.run, self.opts, self.log = list(jobs), run, opts, log
        self.results: dict[int, Result] = {}
        self.t0 = time.perf_counter()

    def _finish(self, i: int, result: Result) -> None:
        self.results[i] = result
        self.log(progress_line(len(self.results), len(self.jobs), result))

    def plan_slides(self) -> tuple[dict[int, Any], dict[int, dict]]:
        import ray

        pre, n_genes = self.run.encoder.pre, len(self.run.bank.genes)
        task = ray.remote(num_cpus=1)(plan_task)
        o = self.opts
        refs = [task.remote(job, pre, n_genes, o.plan, o.reader_pool) for job in self.jobs]
        tiles, plans = {}, {}
        for i, res in enumerate(ray.get(refs)):
            if "error" in res:
                self._finish(i, Result(str(self.jobs[i].slide), 0, round(res["seconds"], 3),
                                       "failed", res["error"], str(self.jobs[i].out)))  # fmt: skip
            else:
                tiles[i], plans[i] = res["tiles"], res
        return tiles, plans

    def dataset(self, tiles, encoder_args, *, gpus_per_worker, readers, actors):
        import ray.data
        from ray.data import ActorPoolStrategy, TaskPoolStrategy

        o, run = self.opts, self.run
        items = [{"job": i} for i in tiles]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.flat_map(
            read_tiles,
            fn_kwargs={"jobs": self.jobs, "tiles": tiles, "patch_size": run.encoder.pre.patch_size,
                       "batch_size": o.batch_size, "workers": o.workers,
                       "reader_pool": o.reader_pool},
            compute=TaskPoolStrategy(size=readers or len(items)), num_cpus=1,
        )  # fmt: skip
        return ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"bank_path": str(run.bank_path), "encoder_args": encoder_args,
                                   "k": run.k, "distance": run.distance},
            compute=ActorPoolStrategy(min_size=1, max_size=actors),
            batch_size=o.batch_size, batch_format="numpy", num_gpus=gpus_per_worker or None,
        )  # fmt: skip

    def execute(self, encoder_args, **kw: Any) -> list[Result]:
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.ERROR)  # our lines say the progress
        ray.data.DataContext.get_current().enable_progress_bars = False
        tiles, plans = self.plan_slides()
        if tiles:
            self._collect(self.dataset(tiles, encoder_args, **kw), tiles, plans)
        return [self.results[i] for i in range(len(self.jobs))]

    def _collect(self, ds, tiles, plans) -> None:
        """Stream the predictions back; write each slide once all its tiles are in."""
        g = len(self.run.bank.genes)
        preds: dict[int, np.ndarray] = {}
        count: dict[int, int] = {}
        first: dict[int, float] = {}
        try:
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i in np.unique(b["job"]).tolist():
                    if i in self.results:
                        continue  # failed while reading
                    m = b["job"] == i
                    errors = [e for e in b["error"][m] if e]
                    if errors:
                        preds.pop(i, None)
                        s = time.perf_counter() - self.t0
                        self._finish(i, Result(str(self.jobs[i].slide), 0, round(s, 3), "failed",
                                               errors[0], str(self.jobs[i].out)))  # fmt: skip
                        continue
                    if i not in preds:
                        preds[i] = np.zeros((len(tiles[i]), g), np.float32)
                        first[i], count[i] = time.perf_counter(), 0
                    preds[i][b["tile"][m]] = b["pred"][m]
                    count[i] += int(m.sum())
                    if count[i] == len(tiles[i]):
                        self._write(i, preds.pop(i), tiles[i], plans[i], first[i])
        except Exception as exc:  # a Ray failure of the pipeline itself (an actor lost)
            for i in tiles:
                if i not in self.results:
                    self._finish(i, failure(self.jobs[i], RuntimeError(f"Ray: {exc}")))
            return
        for i in tiles:  # a slide of zero tiles, or rows lost
            if i not in self.results:
                if len(tiles[i]) == 0:
                    self._write(i, np.zeros((0, g), np.float32), tiles[i], plans[i], self.t0)
                else:
                    err = RuntimeError(f"{count.get(i, 0)} of {len(tiles[i])} tiles came back")
                    self._finish(i, failure(self.jobs[i], err))

    def _write(self, i: int, pred: np.ndarray, tiles, plan: dict, began: float) -> None:
        from mclx.wsi.runtime import predictions

        job, run = self.jobs[i], self.run
        try:
            seconds = plan["seconds"] + time.perf_counter() - began
            timings = {"plan": plan["seconds"], "total": seconds}
            prov = run.provenance(dict(plan["info"]))
            adata = predictions(pred, tiles, run.bank, run.encoder, prov, timings)
            write_slide(adata, job, "ray", self.opts)
        except SLIDE_ERRORS as exc:
            self._finish(i, failure(job, exc))
            return
        seconds = plan["seconds"] + time.perf_counter() - began
        self._finish(i, Result(str(job.slide), len(tiles), round(seconds, 3), "done", "",
                               str(job.out)))  # fmt: skip
