"""Option factories of the ``mclx`` command line (tiatoolbox's ``cli/common.py`` style):
each option is spelled once here and reused by every command that takes it; choices are
read from the registries and config types, not listed again.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_DATA = "../shared/data/her2st"
Decorator = Callable[[Callable], Callable]


class RegistryChoice(click.Choice):
    """A choice among a registry's names, read when first needed (the registries import
    torch, which ``mclx --help`` should not pay for)."""

    def __init__(self, names: Callable[[], Iterable[str]]) -> None:
        self._names, self._choices = names, None
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        if self._choices is None:
            self._choices = tuple(self._names())
        return self._choices

    @choices.setter
    def choices(self, value: Iterable[str]) -> None:
        self._choices = tuple(value)


def _model_names() -> list[str]:
    from mclx.models import MODELS

    return MODELS.names()


def _encoder_names() -> list[str]:
    from mclx.models import ENCODERS

    return ENCODERS.names()


class EncoderChoice(RegistryChoice):
    """A registered encoder, or ``timm:NAME`` (any timm model; checked when built)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, str) and value.startswith("timm:"):
            return value
        return super().convert(value, param, ctx)

    def get_metavar(self, *args: Any, **kwargs: Any) -> str:
        return "[" + "|".join([*self.choices, "timm:NAME"]) + "]"


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the N-th GPU)."""

    name = "[auto|cpu|cuda|cuda:N]"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from mclx.inference.device import resolve_device

        if value == "auto":
            return value
        try:
            return resolve_device(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def literal_choice(alias: Any) -> click.Choice:
    """The values of a ``Literal`` type alias of :mod:`mclx.config` as a click choice."""
    return click.Choice(list(typing.get_args(alias)))


def split_names(values: Sequence[str]) -> list[str]:
    """``("C2,C3", "C4")`` -> ``["C2", "C3", "C4"]``."""
    return [s for v in values for s in v.split(",") if s]


def stack(*decorators: Decorator) -> Decorator:
    """One decorator applying ``decorators`` in the order they are listed (top first)."""

    def deco(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f

    return deco


def _layout_names() -> list[str]:
    from mclx.data.readers import layout_names

    return layout_names()


def data_option() -> Decorator:
    """``--data`` (a folder of any registered layout), ``--layout``, ``--mpp`` and
    ``--image``: read together by :func:`open_data_from`."""
    return stack(
        click.option(
            "--data", type=click.Path(path_type=Path), envvar="MCLX_HER2ST",
            default=DEFAULT_DATA, show_default=True,
            help="Data folder: her2st, legacy ST/STUtility, Visium outs or HEST-1k layout "
            "(detected). Env: MCLX_HER2ST.",
        ),
        click.option(
            "--layout", type=RegistryChoice(_layout_names), default=None,
            help="Force the data layout instead of detecting it.",
        ),
        click.option(
            "--mpp", "data_mpp", type=click.FloatRange(min=0, min_open=True), default=None,
            help="µm/px of the sections' full-resolution images (default: from the spot "
            "grid of the detected array, or the data's metadata).",
        ),
        click.option(
            "--image", "data_images", multiple=True,
            help="Full-resolution image of a section whose folder lacks it (Visium): FILE "
            "for a single-section folder, or SECTION=FILE (repeatable).",
        ),
    )  # fmt: skip


def open_data_from(data: Path, kw: dict[str, Any]):
    """The :class:`~mclx.data.readers.Reader` that ``--data``, ``--layout``, ``--mpp``
    and ``--image`` ask for (those are taken out of ``kw``)."""
    from mclx.data.readers import open_data

    layout, mpp, given = kw.pop("layout"), kw.pop("data_mpp"), kw.pop("data_images")
    pairs = [v.split("=", 1) if "=" in v else [None, v] for v in given]
    reader = open_data(data, layout, mpp=mpp)
    if pairs:
        names = reader.sections()
        if any(name is None for name, _ in pairs) and len(names) != 1:
            msg = (
                f"--image: {data} has {len(names)} sections ({', '.join(names)}); give SECTION=FILE"
            )
            raise click.UsageError(msg)
        images = {name or names[0]: Path(path) for name, path in pairs}
        unknown = sorted(set(images) - set(names))
        if unknown:
            msg = f"--image: no section {unknown[0]!r} in {data} (known: {', '.join(names)})"
            raise click.UsageError(msg)
        reader = open_data(data, reader.name, mpp=mpp, images=images)
    return reader


def out_option(help: str, *, required: bool = False) -> Decorator:
    return click.option(
        "--out", "-o", type=click.Path(path_type=Path), required=required, help=help
    )


def ckpt_option(help: str = "Checkpoint (.pt).", *, required: bool = True) -> Decorator:
    return click.option(
        "--ckpt", type=click.Path(path_type=Path), required=required, default=None, help=help
    )


def sections_option(help: str) -> Decorator:
    return click.option("--sections", multiple=True, help=help + " Comma-separated or repeated.")


def quiet_option(help: str = "No progress bars.") -> Decorator:
    return click.option("--quiet", "-q", is_flag=True, help=help)


def k_option(help: str = "Neighbours retrieved (default: the bank's or model's).") -> Decorator:
    return click.option("--k", type=click.IntRange(1), default=None, help=help)


def distance_option() -> Decorator:
    from mclx.config import Distance

    return click.option(
        "--distance",
        type=literal_choice(Distance),
        default=None,
        help="Distance of the inverse-square weights (default: the bank's or model's, l2).",
    )


def encoder_options() -> Decorator:
    """``--backend``, ``--precision`` and ``--device``, with the choices of the formats
    table (:mod:`mclx.inference.formats`)."""
    from mclx.inference.formats import FORMATS

    def choice(values: Iterable[str]) -> click.Choice:
        return click.Choice(["auto", *dict.fromkeys(values)])

    return stack(
        click.option(
            "--backend", type=choice(f.backend for f in FORMATS.values()), default="auto",
            show_default=True, help="Encoder runtime (auto: the fastest exported one).",
        ),
        click.option(
            "--precision", type=choice(f.precision for f in FORMATS.values()), default="auto",
            show_default=True,
        ),
        click.option(
            "--device", type=DeviceType(), default="auto", show_default=True,
            help="Where the encoder and the bank run; cuda:N picks the N-th GPU.",
        ),
    )  # fmt: skip


def extra_outputs_options() -> Decorator:
    """``mclx infer``'s outputs for other tools (:mod:`mclx.wsi.outputs`)."""
    return stack(
        click.option(
            "--geojson", type=click.Path(path_type=Path), default=None,
            help="Also write the tiles as GeoJSON polygons with the predicted genes as "
            "measurements (QuPath: File > Import objects).",
        ),
        click.option(
            "--geojson-genes", type=click.IntRange(1), default=None,
            help="Only the N genes of highest mean prediction in --geojson (default: all).",
        ),
        click.option(
            "--spatialdata", type=click.Path(path_type=Path), default=None,
            help="Also write a SpatialData store DIR.zarr (image, tile shapes, table); "
            "needs pip install 'mclx[spatialdata]'.",
        ),
    )  # fmt: skip


def model_options() -> Decorator:
    """Model choice, gene selection, ablations and training recipe (train and evaluate)."""
    from mclx.config import LogBase, RecipeName

    return stack(
        click.option(
            "--recipe", "recipe_name", type=literal_choice(RecipeName), default="default",
            show_default=True,
            help="paper: the model's published recipe exactly; default: paper plus the "
            "changes that won leave-one-section-out on her2st (see README). Explicit "
            "options below override either.",
        ),
        click.option(
            "--model", type=RegistryChoice(_model_names), default="mclstexp",
            show_default=True,
            help="Method to train; its publication's architecture and recipe are the "
            "defaults of the options below.",
        ),
        click.option(
            "--encoder", type=EncoderChoice(_encoder_names), default=None,
            help="Image encoder from the registry (default: the model's: densenet121; "
            "vit_b32 for cmrcnet, patch112 for histogene), or timm:NAME, any timm model "
            "with --encoder-weights FILE (needs mclx[timm]; its input size, mean and std "
            "go into the checkpoint).",
        ),
        click.option(
            "--encoder-weights", default="auto", show_default=True,
            help="FILE, 'imagenet' (torchvision cache), 'auto' (cache if present, "
            "else random init with a warning) or 'none'.",
        ),
        click.option(
            "--genes", "genes_file", type=click.Path(path_type=Path),
            help="Gene list (.npy or one per line); default her_hvg_cut_1000.npy.",
        ),
        click.option("--n-hvg", type=click.IntRange(1), help="Use N scanpy HVGs instead."),
        click.option(
            "--log-base", type=literal_choice(LogBase), default="10", show_default=True,
            help="log(1 + x) base after library-size scaling.",
        ),
        training_options(),
        architecture_options(),
        quiet_option(),
    )  # fmt: skip


def training_options() -> Decorator:
    """The optimisation recipe (each default: the model's published value)."""
    return stack(
        click.option(
            "--epochs", type=click.IntRange(1), default=None,
            help="Default: the model's (90; cmrcnet 60, histogene 100).",
        ),
        click.option(
            "--batch-size", type=click.IntRange(2), default=None,
            help="Default: the model's (128; cmrcnet 64; histogene: one section per step).",
        ),
        click.option("--lr", type=float, default=None, help="Default: 1e-4 (histogene 1e-5)."),
        click.option(
            "--weight-decay", type=float, default=None, help="Default: 1e-3 (histogene 0)."
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
            "Transformer), cmrcnet's fusion layers, histogene's blocks (default 8).",
        ),
        click.option(
            "--embed-dim", type=click.IntRange(1), default=None,
            help="Embedding width (default 256; histogene's Transformer width 1024).",
        ),
        click.option(
            "--heads", type=click.IntRange(1), default=None,
            help="Attention heads (default 8; histogene 16).",
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
    )  # fmt: skip


def encoder_weights_arg(value: str) -> str | None:
    return None if value.lower() == "none" else value


def recipe_from(kw: dict[str, Any]):
    """The :class:`~mclx.training.recipe.Recipe` that the options of :func:`model_options` ask
    for: the named recipe's choices (``--recipe``), then the options the user gave."""
    from mclx.training.recipe import Recipe

    overrides: dict[str, Any] = {}
    if kw["no_pos_embed"]:
        overrides["pos_embed"] = False
    if kw["separate_fusion"]:
        overrides["fusion_shared"] = False
    if kw["standardize_features"] is not None:
        overrides["feature_norm"] = kw["standardize_features"]
    for name in ("encoder", "depth", "context", "embed_dim", "heads", "temperature"):
        if kw[name] is not None:
            overrides[name] = kw[name]
    return Recipe(
        model=kw["model"],
        overrides=overrides,
        train=_train_from(kw),
        genes_file=kw["genes_file"],
        n_hvg=kw["n_hvg"],
        log_base=kw["log_base"],
        encoder_weights=encoder_weights_arg(kw["encoder_weights"]),
        name=kw["recipe_name"],
    )


def _train_from(kw: dict[str, Any]):
    """The model's published TrainCfg with the options the user gave."""
    from mclx.models import train_cfg

    recipe = train_cfg(kw["model"])
    given_train = {
        name: kw[name]
        for name in ("epochs", "batch_size", "lr", "weight_decay", "val_fraction")
        if kw[name] is not None
    }
    if kw["feature_views"] is not None:
        given_train["feature_views"] = int(kw["feature_views"])
    return dataclasses.replace(
        recipe,
        **given_train,
        seed=kw["seed"],
        freeze_encoder=recipe.freeze_encoder or kw["freeze_encoder"],  # knn, ridge: always
        augment=recipe.augment and not kw["no_augment"],
    )


def given(ctx: click.Context, *names: str) -> dict[str, Any]:
    """The options among ``names`` that the user typed (not their defaults)."""
    from click.core import ParameterSource

    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {n: ctx.params[n] for n in names if ctx.get_parameter_source(n) in typed}
