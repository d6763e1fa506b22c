"""The options of the commands that train (``mclx train``, ``mclx evaluate``): the
model, its genes, its training recipe and its ablations, each defaulting to the model's
publication; they reach the command as one :class:`ModelOptions`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from mclx.cli.options import (
    Decorator,
    EncoderChoice,
    RegistryChoice,
    into,
    literal_choice,
    quiet_option,
    stack,
)
from mclx.cli.paths import path_option


def _model_names() -> list[str]:
    from mclx.models import MODELS

    return MODELS.names()


def _encoder_names() -> list[str]:
    from mclx.models import ENCODERS

    return ENCODERS.names()


class ModelList(RegistryChoice):
    """One model of the registry, or several separated by commas (``mclx evaluate``'s
    comparison table), each checked against the registry."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        names = [n.strip() for n in str(value).split(",") if n.strip()]
        if not names:
            self.fail("no model named", param, ctx)
        for name in names:
            super().convert(name, param, ctx)
        if len(set(names)) < len(names):
            self.fail(f"a model is named twice in {value!r}", param, ctx)
        return ",".join(names)

    def get_metavar(self, *args: Any, **kwargs: Any) -> str:
        return "NAME[,NAME...]"


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """What :func:`model_options` asked for: the model, its genes, recipe and ablations;
    :meth:`recipe` turns them into a :class:`~mclx.training.recipe.Recipe`."""

    model: str = "mclstexp"
    recipe_name: str = "default"
    encoder: str | None = None
    encoder_weights: str = "auto"
    genes_file: Path | None = None
    n_hvg: int | None = None
    markers: str | None = None
    fov_um: float | None = None
    log_base: str = "10"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    val_fraction: float | None = None
    seed: int = 0
    freeze_encoder: bool = False
    no_augment: bool = False
    feature_views: str | None = None
    no_pos_embed: bool = False
    depth: int | None = None
    embed_dim: int | None = None
    heads: int | None = None
    temperature: float | None = None
    standardize_features: bool | None = None
    separate_fusion: bool = False
    context: str | None = None
    context_radius: float | None = None
    context_mode: str | None = None
    context_fov: float | None = None
    model_opts: tuple[str, ...] = ()

    def models(self) -> list[str]:
        """The model, or the models of a comparison (``--model a,b,c``)."""
        return self.model.split(",")

    def for_model(self, model: str) -> ModelOptions:
        """The same options for ``model``."""
        return dataclasses.replace(self, model=model)

    def recipe(self):
        """The named recipe's choices (``--recipe``), then the options the user gave."""
        from mclx.training.recipe import Recipe

        overrides: dict[str, Any] = {}
        if self.no_pos_embed:
            overrides["pos_embed"] = False
        if self.separate_fusion:
            overrides["fusion_shared"] = False
        if self.standardize_features is not None:
            overrides["feature_norm"] = self.standardize_features
        for name in ("encoder", "depth", "context", "embed_dim", "heads", "temperature"):
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        if self.context_radius is not None:
            overrides["context_radius_um"] = self.context_radius
        if self.context_mode is not None:
            overrides["context_mode"] = self.context_mode
        if self.context_fov is not None:
            overrides["context_fov_um"] = self.context_fov
        if self.model_opts:
            from mclx.config import ModelCfg, parse_fields

            # name and sizes that the data set (genes, positional tables) are not options
            fixed = ("name", "n_genes", "pos_size", "seq_len")
            overrides.update(parse_fields(ModelCfg, self.model_opts, exclude=fixed))
        return Recipe(
            model=self.model,
            overrides=overrides,
            train=self.train_cfg(),
            genes_file=self.genes_file,
            n_hvg=self.n_hvg,
            log_base=self.log_base,
            encoder_weights=self.weights(),
            name=self.recipe_name,
            fov_um=self.fov_um,
            markers=tuple(m.strip() for m in (self.markers or "").split(",") if m.strip()),
        )

    def weights(self) -> str | None:
        """``--encoder-weights``, None for ``none``."""
        return None if self.encoder_weights.lower() == "none" else self.encoder_weights

    def train_cfg(self):
        """The model's published TrainCfg with the options the user gave."""
        from mclx.models import train_cfg

        recipe = train_cfg(self.model)
        given_train = {
            name: getattr(self, name)
            for name in ("epochs", "batch_size", "lr", "weight_decay", "val_fraction")
            if getattr(self, name) is not None
        }
        if self.feature_views is not None:
            given_train["feature_views"] = int(self.feature_views)
        return dataclasses.replace(
            recipe,
            **given_train,
            seed=self.seed,
            freeze_encoder=recipe.freeze_encoder or self.freeze_encoder,  # knn, ridge: always
            augment=recipe.augment and not self.no_augment,
        )


def model_options(several: bool = False) -> Decorator:
    """Model choice, gene selection, ablations and training recipe (train and evaluate),
    as one :class:`ModelOptions` argument ``opts``; and ``--quiet``. With ``several``,
    ``--model`` takes a comma-separated list too."""
    from mclx.config import RecipeName

    help_ = (
        "Method to train; its publication's architecture and recipe are the defaults of "
        "the options below."
    )
    if several:
        help_ += " Several, comma-separated: each is cross-validated and one table compares them."

    return stack(
        into(ModelOptions, "opts"),
        click.option(
            "--recipe", "recipe_name", type=literal_choice(RecipeName), default="default",
            show_default=True,
            help="paper: the model's published recipe exactly; default: paper plus the "
            "changes that won leave-one-section-out on her2st (docs/results.md). Explicit "
            "options below override either.",
        ),
        click.option(
            "--model", type=(ModelList if several else RegistryChoice)(_model_names),
            default="mclstexp", show_default=True, help=help_,
        ),
        click.option(
            "--encoder", type=EncoderChoice(_encoder_names), default=None,
            help="Image encoder from the registry (default: the model's: densenet121; "
            "vit_b32 for cmrcnet, patch112 for histogene, his2st, thitogene), or "
            "timm:NAME, any timm model with --encoder-weights FILE (needs mclx[timm]; "
            "its input size, mean and std go into the checkpoint).",
        ),
        click.option(
            "--encoder-weights", default="auto", show_default=True,
            help="FILE, 'imagenet' (torchvision cache), 'auto' (cache if present, "
            "else random init with a warning) or 'none'.",
        ),
        click.option(
            "--fov-um", type=click.FloatRange(min=0, min_open=True), default=None,
            help="Tissue one patch covers, in µm a side (default: the patch's pixels at the "
            "training images' µm/px); e.g. 100 for a legacy-ST spot, 55 for Visium. Saved "
            "in the checkpoint: bank build and infer cut the same field.",
        ),
        gene_options(),
        training_options(),
        architecture_options(),
        context_options(),
        quiet_option(),
    )  # fmt: skip


def gene_options() -> Decorator:
    """Which genes a model predicts and how their counts are scaled."""
    from mclx.config import LogBase

    return stack(
        path_option(
            "--genes", "genes_file", role="input",
            help="Gene list (.npy or one per line); default her_hvg_cut_1000.npy.",
        ),
        click.option("--n-hvg", type=click.IntRange(1), help="Use N scanpy HVGs instead."),
        click.option(
            "--markers", metavar="GENE,...",
            help="Append these genes to the panel (--genes or --n-hvg) when it lacks them, "
            "e.g. ERBB2,ESR1,PGR,MKI67 (not in her2st's 785-gene list); every section must "
            "measure them.",
        ),
        click.option(
            "--log-base", type=literal_choice(LogBase), default="10", show_default=True,
            help="log(1 + x) base after library-size scaling.",
        ),
    )  # fmt: skip


def training_options() -> Decorator:
    """The optimisation recipe (each default: the model's published value)."""
    return stack(
        click.option(
            "--epochs", type=click.IntRange(1), default=None,
            help="Default: the model's (90; cmrcnet 60, histogene 100, his2st 350, thitogene 300).",
        ),
        click.option(
            "--batch-size", type=click.IntRange(2), default=None,
            help="Default: the model's (128; cmrcnet 64; histogene, his2st, thitogene: one "
            "section per step).",
        ),
        click.option(
            "--lr", type=float, default=None,
            help="Default: 1e-4 (histogene, his2st, thitogene 1e-5).",
        ),
        click.option(
            "--weight-decay", type=float, default=None,
            help="Default: 1e-3 (histogene, his2st, thitogene 0).",
        ),
        click.option(
            "--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
            help="Hold out this fraction of each training section's spots and keep the "
            "epoch with the lowest loss on them (CMRCNet's choice: 0.2). Default 0: the last.",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--freeze-encoder", is_flag=True,
            help="Cache encoder features once; train heads and spot encoder only.",
        ),
        click.option("--no-augment", is_flag=True, help="Disable the reference augmentation."),
        click.option(
            "--feature-views", type=click.Choice(["1", "8"]), default=None,
            help="With --freeze-encoder: cache the features of each training patch as cut "
            "(1) or of its 8 dihedral views, one drawn per spot and step (8). Default 1.",
        ),
    )  # fmt: skip


def architecture_options() -> Decorator:
    """Ablations and sizes of the model (each default: the model's published value)."""
    from mclx.config import Context

    return stack(
        click.option("--no-pos-embed", is_flag=True, help="Ablation: no positional embeddings."),
        click.option(
            "--depth", type=click.IntRange(0), default=None,
            help="Transformer blocks: over spots (mclstexp; 0 = ablation without "
            "Transformer), cmrcnet's fusion layers, histogene's and his2st's blocks "
            "(default 8), thitogene's (4).",
        ),
        click.option(
            "--embed-dim", type=click.IntRange(1), default=None,
            help="Embedding width (default 256; the Transformer width of histogene and "
            "his2st, thitogene's GAT and head width: 1024).",
        ),
        click.option(
            "--heads", type=click.IntRange(1), default=None,
            help="Attention heads (default 8; histogene, his2st, thitogene 16).",
        ),
        click.option(
            "--temperature", type=click.FloatRange(0, min_open=True), default=None,
            help="Softmax temperature of the contrastive loss (mclstexp, bleep, cmrcnet; "
            "the references' 1, except mclstexp with --freeze-encoder under --recipe "
            "default: 10).",
        ),
        click.option(
            "--standardize-features/--no-standardize-features", default=None,
            help="mclstexp, bleep with --freeze-encoder: standardise the pooled features "
            "with the training spots' mean and std (stored in the model). Default: the "
            "recipe's (on in default, off in paper).",
        ),
        click.option(
            "--separate-fusion", is_flag=True,
            help="cmrcnet: each fusion layer its own weights (its reference shares one).",
        ),
        click.option(
            "--context", type=literal_choice(Context), default=None,
            help="Attention context of the spot encoder (default batch).",
        ),
        click.option(
            "--model-opt", "model_opts", multiple=True, metavar="FIELD=VALUE",
            help="Any other model size or option (a ModelCfg field), e.g. his2st's "
            "graph_k=4 graph_radius=2 graph_depth=4 mixer_channels=32 mixer_depth=2, "
            "thitogene's graph_heads=8 capsules=20 capsule_dim=64; repeatable.",
        ),
    )  # fmt: skip


def context_options() -> Decorator:
    """A spot's neighbourhood and wider field of view on frozen features (issue #28)."""
    from mclx.config import ContextMode

    return stack(
        click.option(
            "--context-radius", type=click.FloatRange(0), default=None, metavar="UM",
            help="With --freeze-encoder: each spot reads its features pooled with those of "
            "the spots within UM µm (distance-weighted, on the slide's real scale; "
            "docs/training.md). Default 0: its own patch only.",
        ),
        click.option(
            "--context-mode", type=literal_choice(ContextMode), default=None,
            help="How --context-radius joins the neighbours: mean (default) replaces a "
            "spot's features by the neighbourhood's weighted mean; concat appends the "
            "weighted mean of the other spots to the spot's own features.",
        ),
        click.option(
            "--context-fov", type=click.FloatRange(0), default=None, metavar="UM",
            help="With --freeze-encoder: a second crop of UM µm around each spot (e.g. "
            "3x the patch's field), resized to the patch size and encoded by the same "
            "encoder; its features are appended to the spot's own. Default: 461 for "
            "mclstexp under --recipe default where the sections' µm/px is known, else "
            "0 (none); 0 turns it off.",
        ),
    )  # fmt: skip
