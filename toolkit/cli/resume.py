"""The resumable state of ``mclx train`` and ``mclx infer`` (``--resume``,
``--save-every``): the file beside ``--out``, ready before any work."""

from __future__ import annotations

from pathlib import Path

import click


def ready_state(state, out: Path, resume: bool, what: str):
    """:func:`mclx.run_state.ready_state`, its warning on stderr."""
    from mclx.run_state import ready_state as ready

    return ready(state, out, resume, what, lambda m: click.echo(m, err=True))


def training_state(out: Path, resume: bool, save_every: int | None):
    """The resumable training state beside ``out`` (see :func:`ready_state`)."""
    from mclx.run_state import state_path
    from mclx.training.train_state import StateFile

    return ready_state(StateFile(state_path(out), every=save_every), out, resume, "state")


def state_file(out: Path) -> Path:
    """The state file that a resumable run keeps beside ``out`` (a derived output)."""
    from mclx.run_state import state_path

    return state_path(out)
