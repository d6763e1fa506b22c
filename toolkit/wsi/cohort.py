"""Cohort inference: many slides, one ``.h5ad`` each, on this process or on Ray Data.

The slides come from the command line or a manifest (CSV with a ``slide`` column and
optional ``spots``, ``mpp``, ``out``). Both engines run the one-slide pipeline of
:mod:`mclx.wsi.runtime` (:class:`~mclx.wsi.runtime.Run`: tiles, encoder, retrieval,
:func:`~mclx.wsi.runtime.predictions`) and write each slide as ``mclx infer`` does, atomically:
``local`` slide after slide with one encoder, ``ray`` (:mod:`mclx.wsi.cohort_ray`) with reading
on CPU tasks and the encoder and bank loaded once per actor. A slide that fails is
reported with its one-line error and the others go on; a slide whose output already
holds predictions of the same checkpoint, bank, k and distance is skipped (``force``
redoes it). The result is a summary table (slide, tiles, seconds, status, error).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from mclx.wsi.cohort_jobs import (
    SLIDE_ERRORS,
    Engine,
    Job,
    Options,
    Result,
    already_done,
    failure,
    progress_line,
    write_slide,
)


def run_local(jobs: Sequence[Job], run, opts: Options, log: Callable[[str], None]) -> list[Result]:
    """The jobs one after the other in this process, with one encoder and bank."""
    from mclx.wsi.plan import locate

    results = []
    for n, job in enumerate(jobs, start=1):
        t0 = time.perf_counter()
        try:
            slide, where = locate(job.slide, spots=job.spots, mpp=job.mpp)
            try:
                adata = run.infer(job.slide, slide, where, progress=False,
                                  reader_pool=opts.reader_pool, **opts.plan)  # fmt: skip
            finally:
                slide.close()
            write_slide(adata, job, "local")
        except SLIDE_ERRORS as exc:
            results.append(failure(job, exc, time.perf_counter() - t0))
        else:
            s = time.perf_counter() - t0
            results.append(
                Result(str(job.slide), adata.n_obs, round(s, 3), "done", "", str(job.out))
            )  # noqa: E501
        log(progress_line(n, len(jobs), results[-1]))
    return results


def run_cohort(  # long: the run's options, each documented once in the CLI
    jobs: Sequence[Job],
    *,
    bank_path: str | os.PathLike,
    model: str | os.PathLike | None = None,
    backend: str = "auto",
    precision: str = "auto",
    device: str = "auto",
    k: int | None = None,
    distance: str | None = None,
    engine: Engine = "local",
    force: bool = False,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    readers: int | None = None,
    actors: int | None = None,
    opts: Options | None = None,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Predict every job's slide; the summary rows in the jobs' order.

    The bank and the model are checked (and the encoder opened) once, before any slide;
    with ``engine="ray"`` Ray must be installed (``mclx[ray]``) before anything else.
    """
    from mclx.wsi.runtime import Run

    opts = opts or Options()
    if engine == "ray":
        from mclx.wsi.cohort_ray import require_ray

        require_ray()
    run = Run.open(bank_path, model=model, backend=backend, precision=precision,
                   device=device, k=k, distance=distance)  # fmt: skip
    results: dict[int, Result] = {}
    todo = []
    for i, job in enumerate(jobs):
        if not force and already_done(job, run):
            results[i] = Result(str(job.slide), 0, 0.0, "skipped", "", str(job.out))
        else:
            todo.append(i)
    if len(todo) < len(jobs):
        log(f"mclx: {len(jobs) - len(todo)} slide(s) already done, skipped (--force redoes them)")
    if todo and engine == "ray":
        from mclx.wsi.cohort_ray import run_ray

        done = run_ray(
            [jobs[i] for i in todo], run, opts, address=address, gpus_per_worker=gpus_per_worker,
            readers=readers, actors=actors, log=log,
            encoder_args={"model": str(run.model), "backend": backend, "precision": precision,
                          "device": device},
        )  # fmt: skip
    else:
        done = run_local([jobs[i] for i in todo], run, opts, log) if todo else []
    results.update(zip(todo, done))
    return [results[i] for i in range(len(jobs))]
