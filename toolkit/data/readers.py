"""One dataset interface over the layouts people bring: a registry of readers.

Every reader turns one section into the same AnnData (see :mod:`mclx.data.her2st` for
the full description): raw counts in ``X``; ``obs`` with integer array coordinates ``x``,
``y``, pixel coordinates ``pixel_x``, ``pixel_y``, ``section`` and, when the data has
pathologist labels, ``label``; ``obsm["spatial"]`` the pixel coordinates on the section's
image; ``uns`` with ``section``, ``layout``, ``array`` (:mod:`mclx.data.arrays`),
``image_path`` (None without an image), ``mpp`` (µm/px of that image) and the source
files. Sections without an image still feed banks.

``open_data(path)`` detects the layout (``layout=`` forces one); ``LAYOUTS`` lists them::

    her2st     ST-cnts/ + ST-spotfiles/ (+ ST-imgs/, ST-pat/lbl/), in DIR or DIR/data
    stutility  NAME.tsv counts + alignment_table_NAME.tsv (+ NAME.jpg), legacy ST / STUtility
    visium     Space Ranger outs: filtered_feature_bc_matrix.h5 + spatial/ (or a folder of them)
    hest       HEST-1k: st/ID.h5ad (+ wsis/ID.tif, metadata/ID.json)
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mclx.errors import DataError

LAYOUTS: dict[str, type[Reader]] = {}


def register(cls: type[Reader]) -> type[Reader]:
    """Class decorator: add a reader to :data:`LAYOUTS` under its ``name``."""
    LAYOUTS[cls.name] = cls
    return cls


def _load_layouts() -> None:
    """Import the reader modules (each registers itself); cheap, no heavy imports."""
    from mclx.data import her2st, hest, stutility, visium  # noqa: F401


class Reader:
    """A data folder of one layout. Subclasses set ``name`` and ``looks_for`` and
    implement :meth:`find`, :meth:`sections`, :meth:`image_path` and :meth:`read_section`.

    Args:
        root: the folder (what :meth:`find` returned).
        mpp: µm/px of every section's full-resolution image, instead of the estimate.
        images: full-resolution images by section (layouts whose folders lack them).
    """

    name: str = ""
    looks_for: str = ""

    def __init__(
        self, root: Path, *, mpp: float | None = None, images: Mapping[str, Path] | None = None
    ) -> None:
        self.root, self.mpp, self.images = Path(root), mpp, dict(images or {})

    @classmethod
    def find(cls, path: Path) -> Path | None:
        """The layout's root for ``path`` (itself or a conventional subfolder), or None."""
        raise NotImplementedError

    def sections(self, *, with_image: bool = False) -> list[str]:
        """Section names (those with an image when ``with_image``), sorted."""
        names = self._all_sections()
        return [s for s in names if self.image_path(s) is not None] if with_image else names

    def _all_sections(self) -> list[str]:
        raise NotImplementedError

    def image_path(self, section: str) -> Path | None:
        raise NotImplementedError

    def image_candidates(self, section: str) -> list[Path]:
        """Where this layout looks for ``section``'s image (for messages); empty when it
        does not look by name."""
        return []

    def no_image_message(self) -> str:
        """Why no section has an image: for the first section, the image files looked
        for (a legacy-ST image not named after its section is the usual cause)."""
        names = self._all_sections()
        if not names:
            return f"{self.root}: no sections ({self.name} layout)"
        looked = self.image_candidates(names[0])
        tried = f" (looked for {', '.join(p.name for p in looked)})" if looked else ""
        return (
            f"{self.root}: no section has an image ({self.name} layout): the image of "
            f"{names[0]!r} is not there{tried}; name it after its section, or "
            f"give it with --image {names[0]}=FILE"
        )

    def read_section(self, section: str):
        raise NotImplementedError

    def gene_file(self) -> Path | None:
        """A gene list that ships with the data (her2st's), else None."""
        return None

    def spots(self, section: str):
        """The section's spots on its full-resolution image, for ``mclx infer --spots``:
        a frame of ``id``, ``x``, ``y`` (pixels), ``array_x``, ``array_y``, with the
        image's µm/px in ``attrs["mpp"]``."""
        import pandas as pd

        a = self.read_section(section)
        out = pd.DataFrame(
            {
                "id": [
                    n.split("_", 1)[1] if n.startswith(section + "_") else n for n in a.obs_names
                ],
                "x": a.obs["pixel_x"].to_numpy(),
                "y": a.obs["pixel_y"].to_numpy(),
                "array_x": a.obs["x"].to_numpy(),
                "array_y": a.obs["y"].to_numpy(),
            }
        )
        out.attrs["mpp"] = a.uns.get("mpp")
        return out

    def extent(self) -> tuple[int, int]:
        """Largest array (x, y) + 1 over every section: sizes the positional tables so that
        any section of the folder can later join a bank."""
        xs, ys = [0], [0]
        for a in self.read().values():
            xs.append(int(a.obs["x"].max()))
            ys.append(int(a.obs["y"].max()))
        return max(xs) + 1, max(ys) + 1

    def read(
        self, sections: Sequence[str] | None = None, *, with_image: bool = False
    ) -> dict[str, Any]:
        """``{name: AnnData}`` for ``sections`` (default: all, or all with an image)."""
        if sections is None:
            return {s: self.read_section(s) for s in self.sections(with_image=with_image)}
        known = self.sections()
        for s in sections:
            if s not in known:
                msg = f"{self.root}: section {s!r} does not exist (known: {', '.join(known)})"
                raise KeyError(msg)
            if with_image and self.image_path(s) is None:
                msg = f"{self.root}: section {s!r} has no image ({self.name} layout)"
                raise DataError(msg)
        return {s: self.read_section(s) for s in sections}

    def full_mpp(self, estimate: float | None) -> float | None:
        """µm/px of the full-resolution image: ``--mpp`` when given, else ``estimate``."""
        return float(self.mpp) if self.mpp else estimate

    def finish(self, adata, section: str, *, array: str, image: Path | None, mpp, **files):
        """Set the ``uns`` entries every reader writes; ``mpp`` is the read image's."""
        adata.uns.update(
            section=section,
            layout=self.name,
            array=array,
            image_path=str(image) if image is not None else None,
            mpp=mpp,
            **{k: str(v) for k, v in files.items()},
        )
        return adata

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"


def open_data(
    path: str | os.PathLike | Reader,
    layout: str | None = None,
    *,
    mpp: float | None = None,
    images: Mapping[str, str | os.PathLike] | None = None,
) -> Reader:
    """The reader for ``path``: ``layout`` when given, else the first layout that finds
    its files there. An existing :class:`Reader` is returned as it is."""
    if isinstance(path, Reader):
        return path
    _load_layouts()
    path = Path(path)
    if not path.exists():
        msg = f"{path}: data folder does not exist"
        raise FileNotFoundError(msg)
    if layout is not None:
        cls = layout_class(layout)
        root = cls.find(path)
        if root is None:
            msg = f"{path}: not a {layout} data folder (looked for {cls.looks_for})"
            raise DataError(msg)
        return cls(root, mpp=mpp, images=_images(images))
    for cls in LAYOUTS.values():
        root = cls.find(path)
        if root is not None:
            return cls(root, mpp=mpp, images=_images(images))
    looked = "; ".join(f"{c.name}: {c.looks_for}" for c in LAYOUTS.values())
    msg = f"{path}: no known data layout (looked for {looked})"
    raise DataError(msg)


def layout_class(name: str) -> type[Reader]:
    """The reader class of a layout name; KeyError listing the known (and close) ones."""
    _load_layouts()
    if name not in LAYOUTS:
        close = difflib.get_close_matches(name, LAYOUTS, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        msg = f"unknown data layout {name!r} (known: {', '.join(LAYOUTS)}){hint}"
        raise KeyError(msg)
    return LAYOUTS[name]


def layout_names() -> list[str]:
    _load_layouts()
    return list(LAYOUTS)


def _images(images: Mapping[str, str | os.PathLike] | None) -> dict[str, Path]:
    return {str(k): Path(v) for k, v in (images or {}).items()}


def first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` that is a file in ``folder``."""
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def check_inside(image: Path, obs, size: Callable[[Path], tuple[int, int]] | None = None) -> None:
    """Refuse spots whose pixel coordinates lie outside the image (a wrong scale factor
    or a positions file of another section)."""
    import numpy as np

    from mclx.data.patches import image_size

    width, height = (size or image_size)(image)
    px, py = obs["pixel_x"].to_numpy(), obs["pixel_y"].to_numpy()
    outside = (px < 0) | (py < 0) | (px >= width) | (py >= height) | ~np.isfinite(px + py)
    if outside.any():
        first = obs.index[outside][0]
        msg = (
            f"{image}: {int(outside.sum())} spots lie outside the {width}x{height} image "
            f"(first: {first})"
        )
        raise DataError(msg)


SPOT_SUFFIXES = (".h5ad", ".parquet")


def section_spots(path: str | os.PathLike):
    """Spots for ``mclx infer --spots`` from data rather than a spot table: a data folder
    of one section (any layout), a HEST ``st/ID.h5ad`` or a Visium positions ``.parquet``.
    Returns (frame of ``id, x, y, array_x, array_y``, kind for :func:`mclx.tiling.spot_mpp`)
    with the µm/px in the frame's ``attrs["mpp"]`` when the data knows it."""
    path = Path(path)
    if path.suffix == ".parquet":
        from mclx.data.visium import positions_frame, read_positions_file

        return positions_frame(read_positions_file(path), path), "visium"
    if path.suffix == ".h5ad":
        from mclx.data.hest import HestReader

        reader = HestReader(path.parent.parent) if path.parent.name == "st" else None
        if reader is None:
            msg = f"{path}: an .h5ad spot file must sit in a HEST sample folder (st/ID.h5ad)"
            raise DataError(msg)
        reader_section = path.stem
    else:
        reader = open_data(path)
        names = reader.sections()
        if len(names) != 1:
            msg = (
                f"{path}: --spots takes one section, this {reader.name} folder has "
                f"{len(names)} ({', '.join(names)}); pass that section's own spot file"
            )
            raise DataError(msg)
        reader_section = names[0]
    spots = reader.spots(reader_section)
    return spots, "visium" if reader.name == "visium" else "data"
