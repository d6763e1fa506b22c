"""``mclx infer`` over a cohort: the options, and the run behind them (:mod:`mclx.wsi.cohort`).

One slide without ``--out-dir``/``--manifest``/``--engine ray`` is ``mclx infer`` as
before; anything else is a cohort, written as ``OUT_DIR/STEM.pred.h5ad`` plus
``OUT_DIR/summary.csv``. A cohort takes the outputs of one slide per slide: ``--plot``
maps beside each ``.h5ad``, ``--geojson DIR`` / ``--spatialdata DIR`` as folders of
``STEM.geojson`` / ``STEM.zarr``, ``--resume`` each slide from its own state file.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import click

from mclx.cli.options import into, literal_choice, stack
from mclx.cli.paths import path_option

# options of one-slide runs that a cohort does not take (the manifest has spots per slide)
ONE_SLIDE = {"out": "--out", "spots": "--spots"}


@dataclasses.dataclass(frozen=True)
class CohortOptions:
    """The options that make ``mclx infer`` a cohort run (:func:`cohort_options`)."""

    manifest: Path | None = None
    out_dir: Path | None = None
    engine: str | None = None
    address: str | None = None
    gpus_per_worker: float = 0.0
    readers: int | None = None
    actors: int | None = None
    force: bool = False


def cohort_options():
    """The options that make ``mclx infer`` a cohort run, as one :class:`CohortOptions`
    argument ``cohort``."""
    from mclx.wsi.cohort_jobs import Engine

    return stack(
        into(CohortOptions, "cohort"),
        path_option(
            "--manifest", role="input",
            help="CSV of slides: column slide, optional spots, mpp, out (paths relative to it).",
        ),
        path_option(
            "--out-dir", role="output",
            help="Cohort output folder: STEM.pred.h5ad per slide and summary.csv.",
        ),
        click.option(
            "--engine", type=literal_choice(Engine), default=None,
            help="local (default: slide after slide here) or ray (Ray Data; pip install "
            "'mclx[ray]').",
        ),
        click.option(
            "--address", default=None,
            help="Ray cluster to join (default: RAY_ADDRESS, else a Ray started here).",
        ),
        click.option(
            "--gpus-per-worker", type=click.FloatRange(0), default=0.0, show_default=True,
            help="GPUs per Ray encoder actor (0: CPU actors).",
        ),
        click.option(
            "--readers", type=click.IntRange(1), default=None,
            help="Slides read at once by Ray tasks (default: as many as the CPUs allow).",
        ),
        click.option(
            "--actors", type=click.IntRange(1), default=None,
            help="Ray encoder actors at most (default: GPUs / --gpus-per-worker, else 1).",
        ),
        click.option(
            "--force", is_flag=True,
            help="Redo slides whose output exists with the same checkpoint and bank.",
        ),
    )  # fmt: skip


def is_cohort(slides: tuple[Path, ...], cohort: CohortOptions) -> bool:
    if not slides and not cohort.manifest:
        msg = "infer: give a SLIDE (or several, or --manifest)"
        raise click.UsageError(msg)
    return len(slides) != 1 or bool(cohort.manifest or cohort.out_dir or cohort.engine == "ray")


def cohort_outputs(params: dict[str, Any]):
    """A cohort's derived outputs: each slide's predictions and the summary (nothing
    without --out-dir: the run then says it needs one)."""
    from mclx.run_state import state_path
    from mclx.wsi.cohort_jobs import SUMMARY, cohort_jobs

    out_dir = params.get("out_dir")
    if out_dir is None:
        return
    slides, manifest = params.get("slides") or (), params.get("manifest")
    opts = _options(params)
    for job in cohort_jobs(slides, manifest=manifest, out_dir=out_dir):
        task = opts.task(job)
        yield "output", f"the predictions of {job.slide}", job.out
        yield "output", f"the state file of {job.slide}", state_path(job.out)
        for path in (task.geojson, task.spatialdata):
            if path is not None:
                yield "output", f"an output of {job.slide}", path
        for gene in task.plot:
            yield "output", f"a map of {job.slide}", Path(f"{job.out.with_suffix('')}.{gene}.png")
        if job.spots is not None:
            yield "input", f"the spots of {job.slide}", Path(job.spots)
    yield "output", "the cohort's summary", Path(out_dir) / SUMMARY


def _options(kw: dict[str, Any]):
    """The per-slide settings and outputs of a cohort (:class:`~mclx.wsi.cohort_jobs.Options`)."""
    from mclx.wsi.cohort_jobs import Options

    names = ("batch_size", "stride", "workers", "max_tiles", "reader_pool", "geojson",
             "geojson_genes", "spatialdata", "resume", "save_every")  # fmt: skip
    return Options(**{n: kw.get(n) for n in names if kw.get(n) is not None},
                   plot=tuple(kw.get("plot") or ()))  # fmt: skip


def run_cohort_cli(
    slides: tuple[Path, ...], cohort: CohortOptions, quiet: bool, kw: dict[str, Any]
) -> None:
    """The cohort run of ``mclx infer``: a line per slide, the summary, and one error
    line (exit 1) when a slide failed."""
    from mclx.files import check_output
    from mclx.wsi.cohort import run_cohort
    from mclx.wsi.cohort_jobs import SUMMARY, check_own_outputs, cohort_jobs, write_summary

    given = [flag for key, flag in ONE_SLIDE.items() if kw.pop(key, None) not in (None, (), False)]
    if given:
        msg = f"{', '.join(given)}: for one slide; a cohort (--out-dir) takes spots per slide in --manifest"  # noqa: E501
        raise click.UsageError(msg)
    if cohort.engine == "ray" and (kw.get("resume") or kw.get("save_every") is not None):
        msg = "--resume, --save-every: for local cohorts (--engine ray predicts in Ray's actors)"
        raise click.UsageError(msg)
    out_dir = cohort.out_dir
    if out_dir is None:
        raise click.UsageError("infer: several slides (or --manifest, --engine ray) need --out-dir")
    check_output(out_dir, folder_ok=True)  # created once a slide is written: no empty one
    if out_dir.exists() and not out_dir.is_dir():
        msg = f"{out_dir}: --out-dir is a file, not a folder"
        raise NotADirectoryError(msg)
    if out_dir.is_dir():
        from mclx.folders import check_own_file

        check_output(out_dir / SUMMARY)
        check_own_file(out_dir / SUMMARY, folder=out_dir)
    jobs = cohort_jobs(slides, manifest=cohort.manifest, out_dir=out_dir, mpp=kw.pop("mpp"))
    check_own_outputs(jobs)
    opts = _options(kw)
    for folder in (opts.geojson, opts.spatialdata):  # folders of per-slide outputs
        if folder is not None:
            check_output(folder, folder_ok=True)
    for key in ("batch_size", "stride", "workers", "max_tiles", "reader_pool", "plot",
                "geojson", "geojson_genes", "spatialdata", "resume", "save_every"):  # fmt: skip
        kw.pop(key)
    for folder in (opts.geojson, opts.spatialdata):
        if folder is not None:
            folder.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    from mclx.wsi.engine import InferConfig

    config = InferConfig(bank=kw.pop("bank_path"), **kw)
    results = run_cohort(
        jobs, config, engine=cohort.engine or "local", force=cohort.force,
        address=cohort.address, gpus_per_worker=cohort.gpus_per_worker, readers=cohort.readers,
        actors=cohort.actors, opts=opts, log=(lambda *_: None) if quiet else click.echo,
    )  # fmt: skip
    summary = write_summary(results, out_dir / SUMMARY)
    _report(results, summary, time.perf_counter() - t0)


def _report(results, summary: Path, seconds: float) -> None:
    """The summary table, the totals line, and one error line (exit 1) on a failure."""
    from mclx.wsi.cohort_jobs import format_summary

    tiles = sum(r.tiles for r in results)
    click.echo(format_summary(results))
    failed = [r for r in results if r.status == "failed"]
    done = sum(r.status == "done" for r in results)
    click.echo(
        f"mclx: {done} done, {len(results) - done - len(failed)} skipped, {len(failed)} failed; "
        f"{tiles} tiles in {seconds:.1f} s ({tiles / seconds:.1f} tiles/s); wrote {summary}"
    )
    if failed:
        click.echo(
            f"mclx: error: {len(failed)} of {len(results)} slides failed ({failed[0].error}"
            + (f"; and {len(failed) - 1} more" if len(failed) > 1 else "")
            + f"); see {summary}",
            err=True,
        )
        sys.exit(1)
