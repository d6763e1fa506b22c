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
    record_outputs,
)


def run_local(jobs: Sequence[Job], run, opts: Options, log: Callable[[str], None]) -> list[Result]:
    """The jobs one after the other in this process, with one encoder and bank: each
    slide a task of the one whole-slide engine (:class:`~mclx.wsi.engine.SlideEngine`)."""
    from mclx.wsi.engine import SlideEngine

    engine = SlideEngine(
        opts.config(), progress=False, label="local", run_=run, log=log, make_folders=True
    )
    results = []
    for n, job in enumerate(jobs, start=1):
        t0 = time.perf_counter()
        try:
            adata, written = engine.run(opts.task(job))
        except SLIDE_ERRORS as exc:
            results.append(failure(job, exc, time.perf_counter() - t0))
        else:
            record_outputs(job, written)
            s = time.perf_counter() - t0
            results.append(
                Result(str(job.slide), adata.n_obs, round(s, 3), "done", "", str(job.out))
            )
        log(progress_line(n, len(jobs), results[-1]))
    return results


def run_cohort(  # long: a cohort's own options beside the run's (InferConfig)
    jobs: Sequence[Job],
    config,
    *,
    engine: Engine = "local",
    force: bool = False,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    readers: int | None = None,
    actors: int | None = None,
    opts: Options | None = None,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Predict every job's slide with the run's ``config``
    (:class:`~mclx.wsi.engine.InferConfig`: bank, model, backend, ...; its tiling and
    reading come from ``opts``); the summary rows in the jobs' order.

    The bank and the model are checked (and the encoder opened) once, before any slide;
    with ``engine="ray"`` Ray must be installed (``mclx[ray]``) before anything else.
    """
    from mclx.wsi.runtime import Run

    opts = opts or Options()
    if engine == "ray":
        from mclx.wsi.cohort_ray import require_ray

        require_ray()
    c = config
    run = Run.open(c.bank, model=c.model, backend=c.backend, precision=c.precision,
                   device=c.device, k=c.k, distance=c.distance)  # fmt: skip
    if engine == "ray":  # its actors predict batch by batch
        run.require_batchwise("--engine ray", "--engine local")
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
            encoder_args={"model": str(run.model), "backend": c.backend,
                          "precision": c.precision, "device": c.device},
        )  # fmt: skip
    else:
        done = run_local([jobs[i] for i in todo], run, opts, log) if todo else []
    results.update(zip(todo, done))
    return [results[i] for i in range(len(jobs))]
