"""``mclx train``: a data folder in, a checkpoint out (:func:`mclx.training.run.train`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from mclx.cli.model_options import ModelOptions, model_options
from mclx.cli.options import (
    CONTEXT,
    DataOptions,
    data_option,
    feature_cache,
    feature_cache_option,
    out_option,
    resume_options,
    sections_option,
    split_names,
)
from mclx.cli.paths import MclxCommand
from mclx.cli.resume import state_file, training_state


def _derived(params: dict[str, Any]):
    """The state file beside ``--out``."""
    if params.get("out") is not None:
        yield "output", "--out's state file", state_file(params["out"])


@click.command(cls=MclxCommand, derive=_derived, context_settings=CONTEXT)
@data_option()
@out_option("Checkpoint to write (.pt).", required=True)
@sections_option("Training sections (default: all with images).")
@click.option("--holdout", multiple=True, help="Sections to leave out of training.")
@resume_options(
    "Continue an interrupted run from OUT.state (its last saved epoch); pass the "
    "same arguments (--epochs may grow).",
    "Save the resumable state OUT.state every N epochs (0: never). Default: every "
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
@feature_cache_option()
@model_options()
def train(
    data: DataOptions, out: Path, sections, holdout, resume: bool, save_every: int | None,
    nproc: int, no_feature_cache: bool, opts: ModelOptions, quiet: bool,
) -> None:  # fmt: skip
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
      mclx train --model his2st --holdout C2 --depth 2 --model-opt mixer_channels=16 --out his2st.pt
      mclx train --data ../shared/data/stutility-mob --holdout MOB4 --n-hvg 500 --fov-um 150 \\
          --out mob.pt            # a 150 µm field on 4.4 µm/px legacy-ST images
      mclx train --holdout C2 --markers ERBB2,ESR1,PGR,MKI67 --out model.pt   # markers
          # appended to her2st's 785-gene panel, which lacks them
      mclx train --data ../shared/data/her2st --holdout C2 --nproc 2 --out model.pt
      torchrun --nproc_per_node 4 -m mclx train --data ../shared/data/her2st --out model.pt
    """
    from mclx.files import check_output
    from mclx.training.run import train as run_training

    world = _processes(nproc)
    if world is False:
        return
    main = world is None or world.main  # rank 0 alone writes the state and the checkpoint
    quiet = quiet or not main
    check_output(out)
    reader = data.open()
    recipe = opts.recipe()
    state = training_state(out, resume, save_every if main else 0)
    usage = feature_cache(no_feature_cache)
    done = run_training(
        reader, recipe, out, sections=split_names(sections), holdout=split_names(holdout),
        state=state, world=world, progress=not quiet, resumed=resume,
        encoder_weights=opts.encoder_weights,
    )  # fmt: skip
    if main:
        click.echo(
            f"mclx: trained {opts.model} on {done.n_spots} spots of {', '.join(done.sections)}; "
            f"{done.summary(recipe.train.epochs)}{usage.suffix()}; wrote {out} "
            f"(fingerprint {done.fingerprint})"
        )


def _processes(nproc: int):
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
    return world
