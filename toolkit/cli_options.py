"""Shared pieces of the ``mclx`` command line: option decorators and their translation
into library configs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_DATA = "../shared/data/her2st"


def split_names(values: Sequence[str]) -> list[str]:
    """``("C2,C3", "C4")`` -> ``["C2", "C3", "C4"]``."""
    return [s for v in values for s in v.split(",") if s]


def data_option(f: Callable) -> Callable:
    return click.option(
        "--data",
        "data",
        type=click.Path(path_type=Path),
        envvar="MCLX_HER2ST",
        default=DEFAULT_DATA,
        show_default=True,
        help="her2st-layout folder (ST-cnts/, ST-spotfiles/, ST-imgs/). Env: MCLX_HER2ST.",
    )(f)


def model_options(f: Callable) -> Callable:
    """Model choice, gene selection, ablations and training recipe (train and evaluate)."""
    opts = [
        click.option(
            "--model",
            "model",
            type=click.Choice(["mclstexp", "bleep", "stnet"]),
            default="mclstexp",
            show_default=True,
            help="Method to train.",
        ),
        click.option(
            "--encoder",
            default="densenet121",
            show_default=True,
            help="Image encoder from the registry (densenet121, resnet50, tiny_cnn).",
        ),
        click.option(
            "--encoder-weights",
            default="auto",
            show_default=True,
            help="FILE, 'imagenet' (torchvision cache), 'auto' (cache if present, "
            "else random init with a warning) or 'none'.",
        ),
        click.option(
            "--genes",
            "genes_file",
            type=click.Path(path_type=Path),
            help="Gene list (.npy or one per line); default her_hvg_cut_1000.npy.",
        ),
        click.option("--n-hvg", type=click.IntRange(1), help="Use N scanpy HVGs instead."),
        click.option(
            "--log-base",
            type=click.Choice(["10", "e"]),
            default="10",
            show_default=True,
            help="log(1 + x) base after library-size scaling.",
        ),
        click.option("--epochs", type=click.IntRange(1), default=90, show_default=True),
        click.option("--batch-size", type=click.IntRange(2), default=128, show_default=True),
        click.option("--lr", type=float, default=1e-4, show_default=True),
        click.option("--weight-decay", type=float, default=1e-3, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--freeze-encoder",
            is_flag=True,
            help="Cache encoder features once; train heads and spot encoder only.",
        ),
        click.option("--no-augment", is_flag=True, help="Disable the reference augmentation."),
        click.option("--no-pos-embed", is_flag=True, help="Ablation: no positional embeddings."),
        click.option(
            "--depth",
            type=click.IntRange(0),
            default=None,
            help="Spot Transformer blocks (0 = ablation without Transformer).",
        ),
        click.option(
            "--context",
            type=click.Choice(["batch", "section"]),
            default=None,
            help="Attention context of the spot encoder (default batch).",
        ),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def encoder_weights_arg(value: str) -> str | None:
    return None if value.lower() == "none" else value


def train_cfg_from(kw: dict[str, Any]):
    from mclx.config import TrainCfg

    return TrainCfg(
        epochs=kw["epochs"],
        batch_size=kw["batch_size"],
        lr=kw["lr"],
        weight_decay=kw["weight_decay"],
        seed=kw["seed"],
        freeze_encoder=kw["freeze_encoder"],
        augment=not kw["no_augment"],
    )


def model_overrides_from(kw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"encoder": kw["encoder"]}
    if kw["no_pos_embed"]:
        out["pos_embed"] = False
    if kw["depth"] is not None:
        out["depth"] = kw["depth"]
    if kw["context"] is not None:
        out["context"] = kw["context"]
    return out
