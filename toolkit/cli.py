"""``mclx`` command line: one click group, thin commands over library functions.

Every failure a user can cause ends as one line, ``mclx: error: ...``, on stderr with a
non-zero exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from mclx import __version__
from mclx.cli_cohort import cohort_options
from mclx.cli_options import (
    CONTEXT,
    ckpt_option,
    data_option,
    distance_option,
    encoder_options,
    extra_outputs_options,
    given,
    k_option,
    model_options,
    open_data_from,
    out_option,
    quiet_option,
    recipe_from,
    sections_option,
    split_names,
)
from mclx.cli_view import view
from mclx.files import all_or_nothing, check_output


class _Interrupted(Exception):
    """Ctrl-C inside a command (click would print a blank line for KeyboardInterrupt)."""


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Interrupted from exc


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="mclx")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """mclx: spatial gene expression from H&E histology (mclSTExp).

    \b
    Data flow: train -> checkpoint -> evaluate / bank / export -> infer.
    Run `mclx COMMAND --help` for examples.
    """


@cli.command(context_settings=CONTEXT)
@data_option()
@out_option("Checkpoint to write (.pt).", required=True)
@sections_option("Training sections (default: all with images).")
@click.option("--holdout", multiple=True, help="Sections to leave out of training.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run from OUT.state (its last saved epoch); pass the "
    "same arguments (--epochs may grow).",
)
@click.option(
    "--save-every",
    type=click.IntRange(0),
    default=None,
    help="Save the resumable state OUT.state every N epochs (0: never). Default: every "
    "epoch, or every few when epochs are so short that saving would take over 5% of the time.",
)
@click.option(
    "--nproc",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Data-parallel processes on this machine (DDP: gloo on CPU, NCCL with one GPU "
    "each); --batch-size stays the global batch, negatives are global.",
)
@model_options()
def train(data: Path, out: Path, sections, holdout, resume, save_every, nproc, **kw: Any) -> None:
    """Train a model and write a self-describing checkpoint.

    \b
    While it trains, OUT.state (e.g. model.pt.state) holds the state after the last
    saved epoch; after an interruption `--resume` with the same arguments continues
    from it and writes the checkpoint an uninterrupted run would. It is deleted on success.
    \b
    Examples:
      mclx train --data ../shared/data/her2st --holdout C2 --freeze-encoder --out model.pt
      mclx train --data ../shared/data/her2st --holdout C2 --freeze-encoder --out model.pt --resume
      mclx train --model bleep --sections C3,C4,C5 --epochs 30 --out bleep.pt
      mclx train --model cmrcnet --holdout C2 --freeze-encoder --out cmrcnet.pt
      mclx train --model histogene --embed-dim 128 --depth 2 --heads 4 --out histogene.pt
      mclx train --data ../shared/data/stutility-mob --holdout MOB4 --n-hvg 500 --out mob.pt
      mclx train --data ../shared/data/her2st --holdout C2 --nproc 2 --out model.pt
      torchrun --nproc_per_node 4 -m mclx train --data ../shared/data/her2st --out model.pt
    """
    from mclx.checkpoint import save_checkpoint
    from mclx.training import distributed
    from mclx.training.features import PatchCache
    from mclx.training.recipe import train_model

    world = _processes(nproc, kw)
    if world is False:
        return
    main = world is None or world.main  # rank 0 alone writes the state and the checkpoint
    check_output(out)
    reader = open_data_from(data, kw)
    recipe = recipe_from(kw)
    state = _training_state(out, resume, save_every if main else 0)
    names, held = _training_sections(reader, sections, holdout)
    adatas = reader.read(names, with_image=True)
    pre, net = recipe.setup(reader, adatas, names)
    state.record = recipe.record(
        names, net, pre, holdout=held, encoder_weights=kw["encoder_weights"]
    )
    cache = PatchCache(adatas, pre.patch_size)
    report: dict[str, Any] = {}  # the validation split's losses and the epoch kept
    history, table = train_model(
        net, cache, names, pre, recipe.train, progress=not kw["quiet"], state=state, report=report
    )
    prov = recipe.provenance(
        names, history, data=str(reader.root), layout=reader.name, holdout=held,
        encoder_weights=kw["encoder_weights"], n_spots=len(table), **report,
        **({"resumed_at": state.resumed_at} if resume else {}),
        **(_data_parallel(world, net) if world is not None else {}),
    )  # fmt: skip
    if main:
        fp = save_checkpoint(out, net, preprocess=pre, provenance=prov)
        state.remove()
    if world is not None:
        distributed.shutdown()
    if not main:
        return
    fitted = _fitted(report, recipe, history)
    click.echo(
        f"mclx: trained {kw['model']} on {len(table)} spots of {', '.join(names)}; "
        f"{fitted}; wrote {out} (fingerprint {fp})"
    )


def _fitted(report: dict[str, Any], recipe, history: list[float]) -> str:
    """What training did, for the summary line."""
    if "ridge_alpha" in report:  # fitted in closed form: its cross-validated choice
        return f"alpha {report['ridge_alpha']:g} (CV MSE {history[-1]:.4f})"
    if not recipe.train.epochs:  # knn: nothing to learn
        return "nothing to learn"
    return f"loss {history[0]:.4f} -> {history[-1]:.4f}"


def _processes(nproc: int, kw: dict[str, Any]):
    """This process's place in a data-parallel run (set by torchrun or by a launch;
    None: alone), or False when this call launched ``nproc`` processes, now finished."""
    from mclx.training import distributed

    world = distributed.from_env()
    if nproc > 1 and world is None:
        rc = distributed.launch(click.get_current_context().find_root().obj["argv"], nproc)
        if rc:
            sys.exit(rc)
        return False
    if world is not None and nproc > 1 and nproc != world.size:
        msg = f"--nproc {nproc} but this is process {world.rank} of {world.size} (torchrun?)"
        raise click.UsageError(msg)
    if world is not None and not world.main:
        kw["quiet"] = True
    return world


def _data_parallel(world, net) -> dict:
    """The provenance of a data-parallel run; its processes must end with equal weights."""
    from mclx.training import distributed

    prints = distributed.same_weights(net)
    if len(set(prints)) > 1:
        msg = f"data-parallel processes ended with different weights: {prints}"
        raise RuntimeError(msg)
    return {"data_parallel": {"processes": world.size, "backend": world.backend,
                              "rank_fingerprints": prints}}  # fmt: skip


def _training_state(out: Path, resume: bool, save_every: int | None):
    """The resumable training state beside ``out`` (see :func:`_ready_state`)."""
    from mclx.run_state import state_path
    from mclx.training.train_state import StateFile

    return _ready_state(StateFile(state_path(out), every=save_every), out, resume, "state")


def _ready_state(state, out: Path, resume: bool, what: str):
    """A run's state file, ready: loaded (and checked) now with ``--resume``, before any
    work; otherwise a warning that an interrupted run's ``what`` will be replaced; and
    the temporary files that a killed write of ``out`` or the state left, removed."""
    from mclx.run_state import remove_stale_temps

    if resume:
        state.load()  # fails now, before any work, when missing or corrupt
    elif state.path.exists():
        click.echo(
            f"mclx: warning: {state.path}: an interrupted run's {what} will be replaced "
            "(use --resume to continue it)",
            err=True,
        )
    for p in (out, state.path):
        remove_stale_temps(p)  # left by a killed write
    return state


def _training_sections(reader, sections, holdout) -> tuple[list[str], list[str]]:
    """(training sections, held-out sections): the given or all image sections, once
    each, without the held-out ones (which must exist)."""
    from mclx.errors import DataError

    wanted = split_names(sections) or reader.sections(with_image=True)
    held = set(split_names(holdout))
    unknown = held - set(reader.sections())
    if unknown:
        msg = f"{reader.root}: holdout section(s) {sorted(unknown)} do not exist"
        raise KeyError(msg)
    names = [s for s in dict.fromkeys(wanted) if s not in held]  # repeated: once
    if not names:
        msg = f"{reader.root}: no training section left after --holdout"
        raise DataError(msg)
    return names, sorted(held)


@cli.command(context_settings=CONTEXT)
@data_option()
@sections_option("Sections to cross-validate (default: all with images).")
@click.option(
    "--bank-sections",
    multiple=True,
    help="Extra sections (image not needed) whose spots join every fold's bank; 'all' for "
    "every section of the folder (the held-out section is always left out).",
)
@k_option("Neighbours retrieved (default: 200 mclSTExp, 50 BLEEP).")
@distance_option()
@out_option("Results JSON (per-gene PCC CSV beside it). Default: evaluate_MODEL.json.")
@ckpt_option(
    "Score this trained checkpoint with --bank on --sections (no training).", required=False
)
@click.option(
    "--bank",
    "bank_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Bank for --ckpt (not for models that predict directly: stnet, histogene).",
)
@model_options()
def evaluate(
    data: Path, sections, bank_sections, k, distance, out, ckpt, bank_path, **kw: Any
) -> None:
    """Leave-one-section-out cross-validation: the paper's Table 1.

    \b
    Prints PCC over all genes (ACG), PCC over the 50 most expressed genes of the test
    section (HEG), MSE and MAE per section and mean +- std.
    \b
    Examples:
      mclx evaluate --data ../shared/data/her2st --freeze-encoder --epochs 90
      mclx evaluate --model bleep --freeze-encoder --out bleep.json
      mclx evaluate --freeze-encoder --bank-sections A1,A2,B1 --distance l1
      mclx evaluate --ckpt model.pt --bank her2.npz --sections C2 --out c2.json
      mclx evaluate --data ../shared/data/stutility-mob --freeze-encoder --n-hvg 500 --k 100
    \b
    With --n-hvg N each fold chooses its genes on its training sections only (the
    held-out section's counts never enter the panel); the results JSON says so.
    """
    from mclx.evaluation.evaluate import (
        cross_validate,
        format_table,
        score_checkpoint,
        write_results,
    )

    out = check_output(out or Path(f"evaluate_{kw['model']}.json"))
    reader = open_data_from(data, kw)
    if ckpt is not None or bank_path is not None:
        if ckpt is None or not sections:
            msg = "evaluate: --ckpt needs --sections (the sections to score) and --bank"
            raise click.UsageError(msg)
        res = score_checkpoint(
            ckpt, bank_path, reader, split_names(sections), k=k, distance=distance
        )
        title = f"{ckpt} with {bank_path}"
    else:
        extra = split_names(bank_sections)
        res = cross_validate(
            reader,
            recipe_from(kw),
            sections=split_names(sections) or None,
            bank_sections=reader.sections() if extra == ["all"] else extra,
            k=k,
            distance=distance,
            progress=not kw["quiet"],
        )
        c = res["config"]
        title = (
            f"{kw['model']}: k={c['k']} distance={c['distance']} genes={c['n_genes']} "
            f"epochs={c['train']['epochs']} ({c['seconds']} s)"
        )
    click.echo(format_table(res, title=title))
    json_path, csv_path = write_results(res, out)
    preds = json_path.with_name(json_path.stem + ".predictions.h5ad")
    click.echo(
        f"mclx: wrote {json_path} and {csv_path}"
        + (f" and {preds} (for mclx analyze)" if res.get("predictions") else "")
    )


@cli.group(context_settings=CONTEXT)
def bank() -> None:
    """Build and inspect spot banks (embeddings + expressions for retrieval)."""


@bank.command("build", context_settings=CONTEXT)
@ckpt_option()
@data_option()
@sections_option("Sections to embed (default: every section with counts, image or not).")
@out_option("Bank (.npz).", required=True)
def bank_build(ckpt: Path, data: Path, sections, out: Path, **kw: Any) -> None:
    """Embed spots with a checkpoint's spot encoder and write a bank.

    \b
    Examples:
      mclx bank build --ckpt model.pt --data ../shared/data/her2st --out her2.npz
      mclx bank build --ckpt model.pt --sections C3,C4,C5,C6 --out images_only.npz
      mclx bank build --ckpt mob.pt --data ../shared/data/stutility-mob --out mob.npz
    """
    from mclx.bank import build_bank, save_bank

    check_output(out)
    b = build_bank(ckpt, open_data_from(data, kw), sections=split_names(sections) or None)
    save_bank(b, out)
    click.echo(
        f"mclx: wrote {out}: {len(b)} spots from {len(set(b.sections.tolist()))} sections, "
        f"{len(b.genes)} genes, fingerprint {b.fingerprint}"
    )


@bank.command("info", context_settings=CONTEXT)
@click.argument("path", type=click.Path(path_type=Path))
def bank_info(path: Path) -> None:
    """Describe a bank: size, sections, genes, the checkpoint it came from."""
    from mclx.bank import load_bank

    b = load_bank(path)
    secs = sorted(set(b.sections.tolist()))
    click.echo(
        f"{path}: {len(b)} spots x {b.embeddings.shape[1]}-d embeddings, {len(b.genes)} genes"
    )
    click.echo(f"sections ({len(secs)}): {', '.join(secs)}")
    click.echo(f"checkpoint: {b.checkpoint} (fingerprint {b.fingerprint}, model {b.model})")
    click.echo(f"defaults: k={b.k} distance={b.distance} weighting={b.weighting}")


@cli.command("export", context_settings=CONTEXT)
@ckpt_option()
@click.option(
    "--onnx",
    "onnx_path",
    type=click.Path(path_type=Path),
    help="ONNX output (default: beside the checkpoint, same stem).",
)
@click.option("--opset", type=click.IntRange(13), default=17, show_default=True)
@click.option("--int8", is_flag=True, help="Also write <stem>.int8.onnx (static, calibrated).")
@click.option(
    "--calib-data",
    type=click.Path(path_type=Path),
    help="her2st folder or folder of images for parity and INT8 calibration "
    "(default: random pixels).",
)
@click.option(
    "--openvino",
    is_flag=True,
    help="Also write <stem>.ov-int8.onnx: INT8 for OpenVINO by NNCF (the openvino extra).",
)
@click.option("--trt", is_flag=True, help="Also build a TensorRT engine (NVIDIA GPU only).")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="TensorRT FP16.")
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="Largest batch of the TensorRT optimisation profile.",
)
@quiet_option("Only the final line.")
@click.pass_context
def export_cmd(
    ctx: click.Context, ckpt: Path, onnx_path, int8, calib_data, openvino, trt, quiet, **_
):
    """Export the image encoder to ONNX (and INT8 / TensorRT), checked against PyTorch.

    \b
    Writes model.onnx beside model.pt, then compares it with PyTorch on the same patches:
    FP32 must agree within 1e-4 relative, reduced precisions within cosine 0.99.
    Format options (--opset, --fp16, --max-batch) are refused without their format.
    \b
    Examples:
      mclx export --ckpt model.pt --calib-data ../shared/data/her2st
      mclx export --ckpt model.pt --int8 --calib-data ../shared/data/her2st
      mclx export --ckpt model.pt --openvino --calib-data ../shared/data/her2st
      mclx export --ckpt model.pt --trt --max-batch 128
    """
    from mclx.export.exporter import export

    report = export(
        ckpt,
        onnx_path=onnx_path,
        int8=int8,
        calib_data=calib_data,
        openvino=openvino,
        trt=trt,
        log=(lambda *_: None) if quiet else click.echo,
        **given(ctx, "opset", "fp16", "max_batch"),
    )
    click.echo(f"mclx: exported {ckpt} (fingerprint {report['fingerprint']})")


@cli.command(context_settings=CONTEXT)
@click.argument("slides", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--bank",
    "bank_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Spot bank (.npz) from 'mclx bank build'; none for a model that predicts "
    "directly (ridge, stnet: give --model).",
)
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    help="Checkpoint, .onnx or .engine (default: the bank's checkpoint, with the "
    "best artifact exported beside it).",
)
@encoder_options()
@click.option(
    "--spots",
    type=click.Path(path_type=Path),
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
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run from the predictions saved beside --out (OUT.state).",
)
@click.option(
    "--save-every",
    type=click.IntRange(0),
    default=None,
    help="Save the predictions so far every N batches for --resume (default 64; 0: never).",
)
@cohort_options()
@quiet_option("No progress bar.")
def infer(slides: tuple[Path, ...], bank_path: Path, quiet, **kw: Any) -> None:
    """Predict spatial expression over a whole slide (or at given spots), or a cohort.

    \b
    The .h5ad holds the slide image in uns["spatial"] (scanpy's layout): sc.pl.spatial
    plots it as it is. --geojson opens in QuPath, --spatialdata in napari-spatialdata;
    `mclx view OUT` makes a page to pan and zoom in a browser.
    \b
    Examples:
      mclx infer slide.svs --bank her2.npz --plot FASN --plot IGKC
      mclx infer C2.jpg --bank her2.npz --spots C2_selection.tsv --out C2.h5ad
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
    """
    from mclx.cli_cohort import is_cohort, run_cohort_cli

    if is_cohort(slides, kw):
        return run_cohort_cli(slides, bank_path, quiet, kw)
    for key in ("manifest", "out_dir", "engine", "address", "gpus_per_worker", "readers",
                "actors", "force"):  # fmt: skip
        kw.pop(key)
    _infer_one(slides[0], bank_path, quiet=quiet, **kw)


def _infer_one(
    slide: Path, bank_path: Path, out, plot, geojson, geojson_genes, spatialdata, resume,
    save_every, quiet, **kw: Any,
) -> None:  # fmt: skip
    """``mclx infer`` of one slide."""
    from mclx.wsi.outputs import Outputs
    from mclx.wsi.runtime import infer as run_infer
    from mclx.wsi.writer import add_spatial_image, write_predictions

    out = check_output(out or Path(f"{slide.stem}.pred.h5ad"))
    extra = Outputs(out, plot, geojson, geojson_genes, spatialdata)
    extra.check()
    state = _inference_state(out, resume, save_every)
    adata = run_infer(
        slide, bank_path=bank_path, plot_genes=plot, state=state, progress=not quiet, **kw
    )
    add_spatial_image(adata, slide, mpp=kw["mpp"])
    with all_or_nothing():  # the predictions and every other output, or nothing
        write_predictions(adata, out)
        pngs = extra.write(adata, slide, mpp=kw["mpp"])
    state.remove()
    t = adata.uns["mclx"]["timings"]
    once = "".join(
        f", {what} {t[key]:.1f} s" for key, what in (("warmup", "warm-up"), ("compile", "compile"))
        if t.get(key, 0) >= 0.05
    )  # fmt: skip
    click.echo(
        f"mclx: {adata.n_obs} tiles in {t['total']:.1f} s ({adata.n_obs / t['total']:.1f} "
        f"tiles/s; read {t['read']:.1f} s, encode {t['encode']:.1f} s, retrieve "
        f"{t['retrieve']:.1f} s, write {t['write']:.2f} s{once}) with "
        f"{adata.uns['mclx']['backend']}/"
        f"{adata.uns['mclx']['precision']}; wrote {out}"
        + (f" and {', '.join(str(p) for p in pngs)}" if pngs else "")
    )


cli.add_command(view)


def _inference_state(out: Path, resume: bool, save_every: int | None):
    """The resumable inference state beside ``out`` (see :func:`_ready_state`)."""
    from mclx.run_state import state_path
    from mclx.wsi.infer_state import SAVE_EVERY, InferState

    every = SAVE_EVERY if save_every is None else save_every
    return _ready_state(InferState(state_path(out), every=every), out, resume, "predictions")


@cli.command(context_settings=CONTEXT)
@click.argument("source", type=click.Path(path_type=Path))
@out_option("Folder for the tables, annotated predictions and figures.", required=True)
@click.option(
    "--markers",
    type=click.Path(path_type=Path),
    help="Marker genes (one per line, or .npy) reported as a panel beside ACG, HEG, HVG.",
)
@click.option(
    "--k",
    "n_domains",
    type=click.IntRange(2),
    default=None,
    help="Spatial domains per section (default: the number of labels, else 5).",
)
@click.option("--top", type=click.IntRange(1, 12), default=4, show_default=True,
              help="Top-ranked genes drawn as measured vs predicted maps.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="PCA / KMeans seed.")
def analyze(source: Path, out: Path, markers, n_domains, top, seed) -> None:
    """The paper's analyses on predictions with their truth (beyond Table 1).

    \b
    SOURCE: the results JSON of `mclx evaluate` (or the .predictions.h5ad beside it), or
    any .h5ad with predicted X, layers["measured"] and obs["section"]. Writes to --out:
      gene_ranking.csv   per-gene r and p per section, ranked by mean -log10(p)
      panels.csv         mean PCC over ACG, HEG, HVG (and --markers) per section
      gene_gene.csv      gene-gene correlation preservation per section
      domains.csv        KMeans domains on predicted expression: ARI / NMI vs labels
      analysis.h5ad      the predictions with obs["domain"] and the ranking in var
      *.png              top genes' maps, gene-gene heatmaps, domain maps
    \b
    Examples:
      mclx evaluate --freeze-encoder --out her2.json && mclx analyze her2.json --out her2_analysis
      mclx analyze her2.predictions.h5ad --markers markers.txt --k 6 --out her2_analysis
    """
    from mclx.data.preprocess import load_gene_list
    from mclx.evaluation.analyze import analyze as run_analysis
    from mclx.evaluation.analyze import write_analysis

    genes = load_gene_list(markers) if markers else ()
    res = run_analysis(source, markers=genes, k=n_domains, seed=seed)
    written = write_analysis(res, out, top=top)
    click.echo(res.ranking.head(10)[["rank", "mean_neglog10_p", "mean_pcc"]].to_string())
    click.echo(res.panels.to_string())
    click.echo(f"mclx: wrote {len(written)} files to {out}")


def _close_progress_bars() -> bool:
    """Close live progress bars, so that each ends its line before the error line
    (an abandoned bar would otherwise redraw itself after it when collected)."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        with contextlib.suppress(Exception):
            bar.close()
    return bool(bars)


def _message(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or exc.__class__.__name__


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run the group, turning failures into one ``mclx: error:`` line."""
    from mclx.errors import MclxError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        cli.main(args=args, prog_name="mclx", standalone_mode=False, obj={"argv": args})
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"mclx: error: {_message(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except (_Interrupted, click.exceptions.Abort, KeyboardInterrupt):
        if not _close_progress_bars() and sys.stderr.isatty():
            click.echo(err=True)  # end the line the terminal echoed ^C on
        click.echo("mclx: error: interrupted", err=True)
        sys.exit(130)
    except (MclxError, OSError, ValueError, KeyError, RuntimeError, MemoryError) as exc:
        if debug:
            raise
        _close_progress_bars()
        click.echo(f"mclx: error: {_message(exc)}", err=True)
        sys.exit(1)
