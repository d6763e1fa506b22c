"""The resumable state of ``mclx train`` and ``mclx infer`` (``--resume``,
``--save-every``): the file beside ``--out``, ready before any work."""

from __future__ import annotations

from pathlib import Path

import click


def ready_state(state, out: Path, resume: bool, what: str):
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


def training_state(out: Path, resume: bool, save_every: int | None):
    """The resumable training state beside ``out`` (see :func:`ready_state`)."""
    from mclx.run_state import state_path
    from mclx.training.train_state import StateFile

    return ready_state(StateFile(state_path(out), every=save_every), out, resume, "state")


def inference_state(out: Path, resume: bool, save_every: int | None):
    """The resumable inference state beside ``out`` (see :func:`ready_state`)."""
    from mclx.run_state import state_path
    from mclx.wsi.infer_state import SAVE_EVERY, InferState

    every = SAVE_EVERY if save_every is None else save_every
    return ready_state(InferState(state_path(out), every=every), out, resume, "predictions")


def state_file(out: Path) -> Path:
    """The state file that a resumable run keeps beside ``out`` (a derived output)."""
    from mclx.run_state import state_path

    return state_path(out)
