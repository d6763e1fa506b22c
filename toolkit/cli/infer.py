"""``mclx infer``: one slide (:class:`mclx.wsi.engine.SlideEngine`) or a cohort
(:mod:`mclx.cli.cohort`), with every path it reads and writes declared."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mclx.cli.cohort import CohortOptions, cohort_options, is_cohort, run_cohort_cli
from mclx.cli.options import (
    CONTEXT,
    distance_option,
    encoder_options,
    extra_outputs_options,
    k_option,
    out_option,
    quiet_option,
    resume_options,
)
from mclx.cli.paths import MclxCommand, path_argument, path_option
from mclx.cli.resume import state_file


def predictions_path(out: Path | None, slide: Path) -> Path:
    """``--out``, else ``SLIDE stem + .pred.h5ad`` in the current folder (a Space Ranger
    ``outs/`` folder: its parent's name)."""
    stem = slide.parent.name if slide.name == "outs" else slide.stem
    return out or Path(f"{stem}.pred.h5ad")


def _derived(params: dict[str, Any]):
    """A cohort's per-slide outputs, or one slide's default output, its state file and
    its PNG maps; the checkpoint a bank records (an input when --model is not given)."""
    from mclx.cli.cohort import cohort_outputs

    slides = params.get("slides") or ()
    bank, model = params.get("bank_path"), params.get("model")
    if bank is not None and model is None:
        recorded = _bank_checkpoint(bank)
        if recorded is not None:
            yield "input", "the bank's checkpoint", recorded
    if len(slides) != 1 or params.get("manifest") or params.get("out_dir"):
        yield from cohort_outputs(params)
        return
    out = predictions_path(params.get("out"), Path(slides[0]))
    if params.get("out") is None:
        yield "output", "the default --out", out
    yield "output", "--out's state file", state_file(out)
    for gene in params.get("plot") or ():
        yield "output", f"--plot {gene}", Path(f"{out.with_suffix('')}.{gene}.png")


def _bank_checkpoint(bank: Path) -> Path | None:
    """The checkpoint path a bank records (None when the bank cannot be read: the run
    itself then says why)."""
    import numpy as np

    try:
        with np.load(bank, allow_pickle=False) as z:
            return Path(str(z["checkpoint"]))
    except Exception:  # any unreadable file (a bad zip, not an .npz): the run says why
        return None


@click.command(cls=MclxCommand, derive=_derived, context_settings=CONTEXT)
@path_argument("slides", role="input", nargs=-1)
@path_option(
    "--bank",
    "bank_path",
    role="input",
    default=None,
    help="Spot bank (.npz) from 'mclx bank build'; none for a model that predicts "
    "directly (ridge, stnet, histogene, his2st, thitogene: give --model).",
)
@path_option(
    "--model",
    role="input",
    help="Checkpoint, .onnx or .engine (default: the bank's checkpoint, with the "
    "best artifact exported beside it).",
)
@encoder_options()
@path_option(
    "--spots",
    role="input",
    help="Tiles at these spots: her2st/ST spot file, Visium tissue_positions (.csv, "
    ".parquet), CSV x,y, a HEST st/ID.h5ad, or a one-section data folder of any layout.",
)
@k_option("Neighbours (default: the bank's).")
@distance_option()
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option(
    "--stride",
    type=click.IntRange(1),
    default=None,
    help="Grid step in level-0 px (default: tile size; smaller overlaps).",
)
@click.option(
    "--mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Slide µm per level-0 pixel, when its metadata lacks it (or is not believable).",
)
@click.option("--workers", type=click.IntRange(1), default=2, help="Tile readers (default 2).")
@click.option(
    "--reader-pool",
    type=click.Choice(["threads", "processes"]),
    default="threads",
    show_default=True,
    help="Readers as threads sharing the slide, or processes that open it each (scale with "
    "cores; slides OpenSlide reads, a plain image is always read by threads).",
)
@click.option(
    "--max-tiles",
    type=click.IntRange(1),
    default=None,
    help="Refuse a run of more tiles than this (default 2,000,000), before reading any.",
)
@out_option("Predictions (.h5ad). Default: SLIDE stem + .pred.h5ad in the current folder.")
@click.option("--plot", "plot", multiple=True, help="Write a PNG map for this gene (repeatable).")
@extra_outputs_options()
@resume_options(
    "Continue an interrupted run from the predictions saved beside --out (OUT.state).",
    "Save the predictions so far every N batches for --resume (default 64; 0: never).",
)
@cohort_options()
@quiet_option("No progress bar.")
def infer(slides: tuple[Path, ...], cohort: CohortOptions, quiet: bool, **kw: Any) -> None:
    """Predict spatial expression over a whole slide (or at given spots), or a cohort.

    \b
    The .h5ad holds the slide image in uns["spatial"] (scanpy's layout): sc.pl.spatial
    plots it as it is. --geojson opens in QuPath, --spatialdata in napari-spatialdata;
    `mclx view OUT` makes a page to pan and zoom in a browser.
    \b
    Examples:
      mclx infer slide.svs --bank her2.npz --plot FASN --plot IGKC
      mclx infer C2.jpg --bank her2.npz --spots C2_selection.tsv --out C2.h5ad
      mclx infer V1/outs --bank bank.npz   # Space Ranger: its image (full-resolution,
                                           # else hires + scale factor) at its spots
      mclx infer slide.tif --bank her2.npz --model model.onnx --batch-size 128
      mclx infer slide.svs --bank her2.npz --geojson slide.geojson --geojson-genes 50
    \b
    Cohorts (several slides or --manifest): one .h5ad per slide in --out-dir and a
    summary.csv; a failing slide is reported and the others go on; slides already done
    with the same checkpoint and bank are skipped (--force redoes them).
      mclx infer a.svs b.svs --bank her2.npz --out-dir preds/
      mclx infer --manifest slides.csv --bank her2.npz --out-dir preds/ --engine ray
      mclx infer --manifest slides.csv --bank her2.npz --out-dir preds/ --engine ray \\
          --address ray://head:10001 --gpus-per-worker 1
      mclx infer slide.svs --model ridge.pt             # ridge, stnet: no bank
      mclx infer C2.jpg --model his2st.pt --spots C2_selection.tsv  # section models:
                                         # at spots, with their array coordinates
    """
    if is_cohort(slides, cohort):
        return run_cohort_cli(slides, cohort, quiet, kw)
    _infer_one(slides[0], quiet=quiet, **kw)


def _infer_one(
    slide: Path, out, plot, geojson, geojson_genes, spatialdata, resume, save_every, quiet,
    spots, mpp, **kw: Any,
) -> None:  # fmt: skip
    """``mclx infer`` of one slide."""
    from mclx.wsi.engine import InferConfig, SlideEngine, SlideTask

    out = predictions_path(out, slide)
    task = SlideTask(
        slide, out, spots=spots, mpp=mpp, plot=tuple(plot), geojson=geojson,
        geojson_genes=geojson_genes, spatialdata=spatialdata, resume=resume,
        save_every=save_every,
    )  # fmt: skip
    config = InferConfig(bank=kw.pop("bank_path"), **kw)
    engine = SlideEngine(config, progress=not quiet, log=lambda m: click.echo(m, err=True))
    adata, pngs = engine.run(task)
    click.echo(_summary(adata, out, pngs))


def _summary(adata, out: Path, pngs: list[Path]) -> str:
    """The line a finished one-slide run prints."""
    t = adata.uns["mclx"]["timings"]
    once = "".join(
        f", {what} {t[key]:.1f} s" for key, what in (("warmup", "warm-up"), ("compile", "compile"))
        if t.get(key, 0) >= 0.05
    )  # fmt: skip
    return (
        f"mclx: {adata.n_obs} tiles in {t['total']:.1f} s ({adata.n_obs / t['total']:.1f} "
        f"tiles/s; read {t['read']:.1f} s, encode {t['encode']:.1f} s, "
        + (f"region step {t['region']:.1f} s, " if "region" in t else "")
        + "retrieve "
        f"{t['retrieve']:.1f} s, write {t['write']:.2f} s{once}) with "
        f"{adata.uns['mclx']['backend']}/"
        f"{adata.uns['mclx']['precision']}{_chosen(adata.uns['mclx'].get('parity'))}"
        f"{_tiled(adata.uns['mclx'])}; wrote {out}"
        + (f" and {', '.join(str(p) for p in pngs)}" if pngs else "")
    )


def _tiled(record) -> str:
    """How much of the tissue mask a tissue grid covered (nothing for given spots)."""
    share = record.get("tissue_tiled")
    return "" if share is None else f"; tiled {float(share):.0%} of the tissue mask"


def _chosen(parity) -> str:
    """How ``--backend auto`` chose the format (nothing for a named backend)."""
    if not parity:
        return ""
    if not parity.get("held", True):
        return f" ({parity['format']}: as --precision asked; --backend auto would not take it)"
    return f" (auto: {parity['format']}, the fastest whose {parity.get('gate', '')} parity held)"
