"""``train``: a data folder and a recipe in, a checkpoint out; what ``mclx train`` calls.

One function owns the run: the sections, the preprocessing and model the recipe sets up,
the patch cache, the loop (:func:`mclx.training.recipe.train_model`), the provenance and
the checkpoint; data-parallel processes (:mod:`mclx.training.distributed`) each call it,
and rank 0 alone writes the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Trained:
    """What a training run did: its sections, spots, losses, the closed-form fit's
    report (ridge's alpha) and the checkpoint's fingerprint (None on ranks > 0)."""

    sections: list[str]
    n_spots: int
    history: list[float]
    report: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None

    def summary(self, epochs: int) -> str:
        """What training did, for the summary line."""
        if "ridge_alpha" in self.report:  # fitted in closed form: its cross-validated choice
            return f"alpha {self.report['ridge_alpha']:g} (CV MSE {self.history[-1]:.4f})"
        if not epochs:  # knn: nothing to learn
            return "nothing to learn"
        return f"loss {self.history[0]:.4f} -> {self.history[-1]:.4f}"


def training_sections(reader, sections: Sequence[str], holdout: Sequence[str]):
    """(training sections, held-out sections): the given or all image sections, once
    each, without the held-out ones (which must exist)."""
    from mclx.errors import DataError

    wanted = list(sections) or reader.sections(with_image=True)
    held = set(holdout)
    unknown = held - set(reader.sections())
    if unknown:
        msg = f"{reader.root}: holdout section(s) {sorted(unknown)} do not exist"
        raise KeyError(msg)
    names = [s for s in dict.fromkeys(wanted) if s not in held]  # repeated: once
    if not names:
        msg = f"{reader.root}: no training section left after --holdout"
        raise DataError(msg)
    return names, sorted(held)


def train(  # long: the run in order, each step one call
    reader,
    recipe,
    out: str | Path,
    *,
    sections: Sequence[str] = (),
    holdout: Sequence[str] = (),
    state=None,
    world=None,
    progress: bool = True,
    resumed: bool = False,
    encoder_weights: str | None = None,
) -> Trained:
    """Train ``recipe``'s model on ``reader``'s sections and write the checkpoint ``out``.

    Args:
        reader: the data (:func:`mclx.data.readers.open_data`).
        recipe: a :class:`~mclx.training.recipe.Recipe`.
        sections: training sections (default: every section with an image).
        holdout: sections left out (recorded in the provenance).
        state: the resumable state (:class:`~mclx.training.train_state.StateFile`).
        world: this process's place in a data-parallel run (None: alone).
        resumed: the run continues ``state`` (recorded in the provenance).
        encoder_weights: the encoder weights as the user named them, for the provenance
            (default: the recipe's).
    """
    from mclx.checkpoint import save_checkpoint
    from mclx.training import distributed
    from mclx.training.features import PatchCache
    from mclx.training.recipe import train_model

    main = world is None or world.main  # rank 0 alone writes the state and the checkpoint
    names, held = training_sections(reader, sections, holdout)
    adatas = reader.read(names, with_image=True)
    pre, net = recipe.setup(reader, adatas, names)
    weights = recipe.encoder_weights if encoder_weights is None else encoder_weights
    if state is not None:
        state.record = recipe.record(names, net, pre, holdout=held, encoder_weights=weights)
    cache = PatchCache(adatas, pre.patch_size)
    report: dict[str, Any] = {}  # the validation split's losses and the epoch kept
    history, table = train_model(
        net, cache, names, pre, recipe.train, progress=progress, state=state, report=report
    )
    prov = recipe.provenance(
        names, history, data=str(reader.root), layout=reader.name, holdout=held,
        encoder_weights=weights, n_spots=len(table), **report,
        **({"resumed_at": state.resumed_at} if resumed else {}),
        **(_data_parallel(world, net) if world is not None else {}),
    )  # fmt: skip
    done = Trained(names, len(table), history, report)
    if main:
        done.fingerprint = save_checkpoint(out, net, preprocess=pre, provenance=prov)
        if state is not None:
            state.remove()
    if world is not None:
        distributed.shutdown()
    return done


def _data_parallel(world, net) -> dict:
    """The provenance of a data-parallel run; its processes must end with equal weights."""
    from mclx.training import distributed

    prints = distributed.same_weights(net)
    if len(set(prints)) > 1:
        msg = f"data-parallel processes ended with different weights: {prints}"
        raise RuntimeError(msg)
    return {"data_parallel": {"processes": world.size, "backend": world.backend,
                              "rank_fingerprints": prints}}  # fmt: skip
