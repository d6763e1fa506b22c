"""``mclx infer`` over a cohort: the options, and the run behind them (:mod:`mclx.wsi.cohort`).

One slide without ``--out-dir``/``--manifest``/``--engine ray`` is ``mclx infer`` as
before; anything else is a cohort, written as ``OUT_DIR/STEM.pred.h5ad`` plus
``OUT_DIR/summary.csv``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from mclx.cli_options import literal_choice, stack

# options of one-slide runs that a cohort does not take (the manifest has spots per slide)
ONE_SLIDE = {
    "out": "--out",
    "resume": "--resume",
    "save_every": "--save-every",
    "plot": "--plot",
    "geojson": "--geojson",
    "spatialdata": "--spatialdata",
    "spots": "--spots",
}


def cohort_options():
    """The options that make ``mclx infer`` a cohort run."""
    from mclx.wsi.cohort_jobs import Engine

    return stack(
        click.option(
            "--manifest", type=click.Path(path_type=Path),
            help="CSV of slides: column slide, optional spots, mpp, out (paths relative to it).",
        ),
        click.option(
            "--out-dir", type=click.Path(path_type=Path),
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


def is_cohort(slides: tuple[Path, ...], kw: dict[str, Any]) -> bool:
    if not slides and not kw["manifest"]:
        msg = "infer: give a SLIDE (or several, or --manifest)"
        raise click.UsageError(msg)
    return len(slides) != 1 or bool(kw["manifest"] or kw["out_dir"] or kw["engine"] == "ray")


def run_cohort_cli(slides: tuple[Path, ...], bank_path: Path, quiet: bool, kw: dict[str, Any]):
    """The cohort run of ``mclx infer``: a line per slide, the summary, and one error
    line (exit 1) when a slide failed."""
    from mclx.files import check_output
    from mclx.wsi.cohort import run_cohort
    from mclx.wsi.cohort_jobs import (
        SUMMARY,
        Options,
        cohort_jobs,
        format_summary,
        write_summary,
    )

    given = [flag for key, flag in ONE_SLIDE.items() if kw.pop(key, None) not in (None, (), False)]
    if given:
        msg = f"{', '.join(given)}: for one slide; a cohort (--out-dir) takes spots per slide in --manifest"  # noqa: E501
        raise click.UsageError(msg)
    for key in ("geojson_genes",):
        kw.pop(key, None)
    if kw["out_dir"] is None:
        raise click.UsageError("infer: several slides (or --manifest, --engine ray) need --out-dir")
    out_dir = kw.pop("out_dir")
    check_output(out_dir, folder_ok=True)  # created once a slide is written: no empty one
    if out_dir.exists() and not out_dir.is_dir():
        msg = f"{out_dir}: --out-dir is a file, not a folder"
        raise NotADirectoryError(msg)
    if out_dir.is_dir():
        check_output(out_dir / SUMMARY)
    jobs = cohort_jobs(slides, manifest=kw.pop("manifest"), out_dir=out_dir, mpp=kw.pop("mpp"))
    opts = Options(batch_size=kw.pop("batch_size"), stride=kw.pop("stride"),
                   workers=kw.pop("workers"), max_tiles=kw.pop("max_tiles"),
                   reader_pool=kw.pop("reader_pool"))  # fmt: skip
    t0 = time.perf_counter()
    results = run_cohort(
        jobs, bank_path=bank_path, engine=kw.pop("engine") or "local", opts=opts,
        log=(lambda *_: None) if quiet else click.echo, **kw,
    )  # fmt: skip
    summary = write_summary(results, out_dir / SUMMARY)
    seconds = time.perf_counter() - t0
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
