"""Option factories of the ``mclx`` command line (tiatoolbox's ``cli/common.py`` style):
each option is spelled once here and reused by every command that takes it; choices are
read from the registries and config types, not listed again. Options that name files say
whether the command reads or writes them (:mod:`mclx.cli.paths`); options read together
arrive as one typed object (:func:`into`), not as keys popped from ``**kw``.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click

from mclx.cli.paths import path_option

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


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """``--data`` (a folder of any registered layout), ``--layout``, ``--mpp`` and
    ``--image``, read together by :meth:`open`."""

    data: Path
    layout: str | None = None
    data_mpp: float | None = None
    data_images: tuple[str, ...] = ()

    def open(self):
        """The :class:`~mclx.data.layout.Reader` these options ask for."""
        from mclx.data.readers import open_data

        data, mpp = self.data, self.data_mpp
        pairs = [v.split("=", 1) if "=" in v else [None, v] for v in self.data_images]
        reader = open_data(data, self.layout, mpp=mpp)
        if pairs:
            names = reader.sections()
            if any(name is None for name, _ in pairs) and len(names) != 1:
                msg = (
                    f"--image: {data} has {len(names)} sections ({', '.join(names)}); "
                    "give SECTION=FILE"
                )
                raise click.UsageError(msg)
            images = {name or names[0]: Path(path) for name, path in pairs}
            unknown = sorted(set(images) - set(names))
            if unknown:
                msg = f"--image: no section {unknown[0]!r} in {data} (known: {', '.join(names)})"
                raise click.UsageError(msg)
            reader = open_data(data, reader.name, mpp=mpp, images=images)
        return reader


def into(cls: type, name: str) -> Decorator:
    """Collect the parameters that are fields of dataclass ``cls`` into one ``cls``
    object passed to the command as ``name`` (put above the options it collects)."""
    fields = {f.name for f in dataclasses.fields(cls)}

    def deco(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args: Any, **kw: Any) -> Any:
            kw[name] = cls(**{k: kw.pop(k) for k in fields if k in kw})
            return f(*args, **kw)

        return wrapper

    return deco


def data_option() -> Decorator:
    """``--data``, ``--layout``, ``--mpp`` and ``--image`` as one :class:`DataOptions`
    argument ``data``."""
    return stack(
        into(DataOptions, "data"),
        path_option(
            "--data", role="input", envvar="MCLX_HER2ST", default=DEFAULT_DATA,
            show_default=True,
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


def out_option(help: str, *, required: bool = False, folder: bool = False) -> Decorator:
    """``--out``/``-o``: a file the command writes (``folder``: a folder it writes)."""
    role = "output_folder" if folder else "output"
    return path_option("--out", "-o", role=role, required=required, help=help)


def ckpt_option(help: str = "Checkpoint (.pt).", *, required: bool = True) -> Decorator:
    return path_option("--ckpt", role="input", required=required, default=None, help=help)


def resume_options(resume_help: str, save_every_help: str) -> Decorator:
    """``--resume`` and ``--save-every`` of a run that saves its state beside ``--out``."""
    return stack(
        click.option("--resume", is_flag=True, help=resume_help),
        click.option("--save-every", type=click.IntRange(0), default=None, help=save_every_help),
    )


def sections_option(help: str) -> Decorator:
    return click.option("--sections", multiple=True, help=help + " Comma-separated or repeated.")


def force_option(help: str) -> Decorator:
    return click.option("--force", is_flag=True, help=help)


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
        path_option(
            "--geojson", role="output", default=None,
            help="Also write the tiles as GeoJSON polygons with the predicted genes as "
            "measurements (QuPath: File > Import objects).",
        ),
        click.option(
            "--geojson-genes", type=click.IntRange(1), default=None,
            help="Only the N genes of highest mean prediction in --geojson (default: all).",
        ),
        path_option(
            "--spatialdata", role="output_folder", default=None,
            help="Also write a SpatialData store DIR.zarr (image, tile shapes, table); "
            "needs pip install 'mclx[spatialdata]'.",
        ),
    )  # fmt: skip


def given(ctx: click.Context, *names: str) -> dict[str, Any]:
    """The options among ``names`` that the user typed (not their defaults)."""
    from click.core import ParameterSource

    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {n: ctx.params[n] for n in names if ctx.get_parameter_source(n) in typed}


def feature_cache_option() -> Decorator:
    """``--no-feature-cache``: encode every section again, neither reading nor writing
    the frozen-feature cache (:mod:`mclx.training.feature_store`)."""
    return click.option(
        "--no-feature-cache",
        "no_feature_cache",
        is_flag=True,
        help="Encode every section again instead of reading frozen features cached by an "
        "earlier command (see `mclx cache info`; MCLX_FEATURE_CACHE=0 does the same).",
    )


def feature_cache(no_feature_cache: bool):
    """This command's use of the frozen-feature cache, open until the command ends (its
    :class:`~mclx.training.feature_store.Usage` gives the summary line's words)."""
    from mclx.training import feature_store

    ctx = click.get_current_context()
    return ctx.with_resource(feature_store.session(not no_feature_cache))
