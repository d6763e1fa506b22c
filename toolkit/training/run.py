"""``train``: a data folder and a recipe in, a checkpoint out; what ``mclx train`` calls.

One module owns the run: the sections, the preprocessing and model the recipe sets up,
the patch cache, the loop (:func:`train_model` around :func:`mclx.training.train.fit`,
with the resumable state), the provenance and the checkpoint. The recipe only says what
to train; data-parallel processes (:mod:`mclx.training.distributed`) each call
:func:`train`, and rank 0 alone writes the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mclx.config import PreprocessCfg, TrainCfg
from mclx.training.features import PatchCache, encoder_fingerprint

if TYPE_CHECKING:
    from mclx.data.dataset import SpotTable
    from mclx.training.train_state import StateFile


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
    if not wanted:
        raise DataError(reader.no_image_message())
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


def train_model(
    model,
    cache: PatchCache,
    sections: Sequence[str],
    pre: PreprocessCfg,
    cfg: TrainCfg,
    *,
    progress: bool = True,
    state: StateFile | None = None,
    report: dict[str, Any] | None = None,
) -> tuple[list[float], SpotTable]:
    """Fit ``model`` on the image spots of ``sections``; return loss history and table.

    Args:
        state: save a resumable state after each epoch, and continue from the one it
            loaded (if any) once the run's record (completed here with the data digest
            and, for a frozen encoder, its fingerprint) is checked against it.
        report: see :func:`mclx.training.train.fit` (the validation split's record).
    """
    from mclx.errors import FormatError
    from mclx.training.train import StateMismatch, fit

    table = cache.table(sections, pre)
    if hasattr(model, "fit_features"):  # knn, ridge: closed form on frozen features
        return _fit_closed_form(model, cache, table, pre, progress, state, report), table
    fp = encoder_fingerprint(model.image_encoder) if cfg.freeze_encoder else None
    start = on_epoch = None
    if state is not None:
        from mclx.training.train_state import data_digest

        state.record.update(data=data_digest(table), n_spots=len(table), encoder=fp)
        start = state.start(cfg.epochs)  # before the (slow) feature pass

        def on_epoch(epoch, snapshot):
            state.on_epoch(epoch, cfg.epochs, snapshot)

    feats = _frozen_features(model, cache, sections, pre, progress, cfg.feature_views, cfg)
    _standardise(model, feats)
    try:
        history = fit(
            model,
            table,
            cfg,
            pre,
            features=feats,
            progress=progress,
            start=start,
            on_epoch=on_epoch,
            report=report,
        )
    except StateMismatch as exc:
        msg = f"{state.path if state else 'training state'}: {exc} (corrupt file?)"
        raise FormatError(msg) from exc
    except BaseException:
        if state is not None:
            state.wait(quiet=True)  # a state being written is finished, not torn
        raise
    if state is not None:
        state.wait()
    return history, table


def _fit_closed_form(model, cache, table, pre, progress, state, report) -> list[float]:
    """Fit a closed-form model (knn, ridge) on the frozen pooled features of ``table``'s
    sections; its fit record goes to ``report``. Nothing to resume: the state goes."""
    feats = _frozen_features(model, cache, list(table.sections), pre, progress)
    fitted = model.fit_features(feats, table)
    if report is not None:
        report.update({k: v for k, v in fitted.items() if k != "history"})
    if state is not None:
        state.remove()
    model.eval()
    return fitted["history"]


def _standardise(model, feats: np.ndarray | None) -> None:
    """With ``feature_norm``: the training spots' feature statistics (over every cached
    view) into the model (a resumed run restores the same values with its weights)."""
    if not getattr(model.cfg, "feature_norm", False):
        return
    pooled = getattr(model, "feature_kind", "pooled") == "pooled"
    if feats is None or not pooled or not hasattr(model, "set_feature_stats"):
        msg = (
            "feature standardisation applies to a frozen encoder's pooled features "
            "(mclstexp, bleep, histogene, his2st, thitogene with --freeze-encoder and a "
            f"pooling encoder), not to {model.cfg.name} here"
        )
        raise ValueError(msg)
    model.set_feature_stats(feats.reshape(-1, feats.shape[-1]))


def _frozen_features(
    model, cache: PatchCache, sections, pre, progress: bool, views: int = 1, cfg=None
) -> np.ndarray | None:
    """The frozen encoder's features of ``sections``, as the model trains on them:
    pooled (N, F), pooled per dihedral view (N, ``views``, F), or every token
    (``feature_kind = "tokens"``: CMRCNet); None when ``cfg`` trains the encoder."""
    from mclx.training import context

    context.check(model.cfg)
    if cfg is not None and not cfg.freeze_encoder:
        if context.options(model.cfg):
            opts = " ".join(context.options(model.cfg))
            msg = f"{opts}: joins cached frozen features, it needs --freeze-encoder"
            raise ValueError(msg)
        return None
    tokens = getattr(model, "feature_kind", "pooled") == "tokens"
    if views != 1 and (tokens or hasattr(model, "fit_features")):
        msg = (
            f"feature views apply to the heads of mclstexp, bleep and stnet on pooled "
            f"features, not to {model.cfg.name}"
        )
        raise ValueError(msg)
    parts = [
        context.section_features(
            cache, model, s, pre, tokens=tokens, views=views, progress=progress
        )
        for s in sections
    ]
    return np.concatenate(parts)
