"""The tiny model most tests need, built one way: a ``tiny_cnn`` mclSTExp (or another
registered model) trained on synthetic sections with the folder's ``genes.txt``, a
frozen encoder with no pretrained weights, a few epochs.

- On the command line, as a user runs it: :func:`tiny_options` (the model and training
  options shared by ``mclx train`` and ``mclx evaluate``), :func:`tiny_train_args`
  (a whole ``mclx train`` argument list) and :func:`train_tiny_cli` (run it).
- In process, through the same :class:`~mclx.training.recipe.Recipe` the command line builds:
  :func:`tiny_recipe`, :func:`tiny_model` (set up, optionally train) and
  :meth:`Tiny.save` (a checkpoint).

The defaults of both are the same run: the CLI options map onto the Recipe's fields.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = ("S1", "S2")
EPOCHS = 3
BATCH_SIZE = 32
_AUTO: Any = object()


def _genes(data: Path, genes_file):
    if genes_file is _AUTO:
        return data / "genes.txt" if (data / "genes.txt").is_file() else None
    return genes_file


def tiny_options(
    data: str | os.PathLike,
    *,
    model: str | None = None,
    encoder: str = "tiny_cnn",
    epochs: int | None = EPOCHS,
    batch_size: int | None = BATCH_SIZE,
    lr: float | None = None,
    frozen: bool = True,
    genes_file: Any = _AUTO,
) -> list[str]:
    """The model and training options of the tiny run (``None``: leave the option to
    its command-line default)."""
    data = Path(data)
    args: list[Any] = [] if model is None else ["--model", model]
    args += ["--encoder", encoder, "--encoder-weights", "none"]
    genes = _genes(data, genes_file)
    if genes is not None:
        args += ["--genes", genes]
    for flag, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--lr", lr)):
        if value is not None:
            args += [flag, value]
    if frozen:
        args.append("--freeze-encoder")
    return [str(a) for a in args]


def tiny_train_args(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *extra: Any,
    sections: str | None = ",".join(SECTIONS),
    quiet: bool = True,
    **options: Any,
) -> list[str]:
    """``mclx train`` of the tiny model on ``sections`` (None: every image section)
    writing ``out``; ``extra`` arguments come last (they override earlier ones);
    ``options`` go to :func:`tiny_options`."""
    args: list[Any] = ["train", "--data", data]
    if sections is not None:
        args += ["--sections", sections]
    args += tiny_options(data, **options)
    args += [*(["-q"] if quiet else []), "--out", out, *extra]
    return [str(a) for a in args]


def train_tiny_cli(data: str | os.PathLike, out: str | os.PathLike, *extra, **kw) -> Path:
    """Run :func:`tiny_train_args` in a subprocess; the checkpoint's path."""
    from helpers.cli import mclx

    res = mclx(*tiny_train_args(data, out, *extra, **kw))
    assert res.returncode == 0, res.stderr
    return Path(out)


def tiny_recipe(
    data: str | os.PathLike,
    *,
    model: str = "mclstexp",
    encoder: str = "tiny_cnn",
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = 1e-4,
    seed: int = 0,
    frozen: bool = True,
    augment: bool = True,
    genes_file: Any = _AUTO,
    encoder_weights: str | None = None,
    **overrides: Any,
):
    """The :class:`~mclx.training.recipe.Recipe` of the tiny run; ``overrides`` are ModelCfg
    fields (``context``, ``depth``, ...)."""
    from mclx.config import TrainCfg
    from mclx.training.recipe import Recipe

    train = TrainCfg(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        freeze_encoder=frozen,
        augment=augment,
    )
    return Recipe(
        model=model,
        overrides={"encoder": encoder, **overrides},
        train=train,
        genes_file=_genes(Path(data), genes_file),
        encoder_weights=encoder_weights,
    )


@dataclass
class Tiny:
    """A model set up (and trained, unless asked not to) by :func:`tiny_model`."""

    net: Any
    pre: Any
    recipe: Any
    sections: list[str]
    adatas: dict[str, Any]
    history: list[float] = field(default_factory=list)
    table: Any = None

    def save(self, path: str | os.PathLike) -> Path:
        """The model as a checkpoint at ``path``, with the provenance ``mclx train``
        writes."""
        from mclx.checkpoint import save_checkpoint

        prov = self.recipe.provenance(self.sections, self.history)
        save_checkpoint(path, self.net, preprocess=self.pre, provenance=prov)
        return Path(path)


def tiny_model(
    data: str | os.PathLike,
    sections: Sequence[str] = SECTIONS,
    *,
    recipe=None,
    train: bool = True,
    progress: bool = False,
    **kw: Any,
) -> Tiny:
    """Set up the tiny model on ``sections`` of ``data`` (``recipe``, default
    :func:`tiny_recipe` with ``kw``) and, with ``train``, fit it."""
    from mclx.data.her2st import read_her2st
    from mclx.training.features import PatchCache
    from mclx.training.run import train_model

    recipe = recipe or tiny_recipe(data, **kw)
    sections = list(sections)
    adatas = read_her2st(data, sections, with_image=True)
    pre, net = recipe.setup(data, adatas, sections)
    tiny = Tiny(net, pre, recipe, sections, adatas)
    if train:
        cache = PatchCache(adatas, pre.patch_size)
        tiny.history, tiny.table = train_model(
            net, cache, sections, pre, recipe.train, progress=progress
        )
    return tiny
