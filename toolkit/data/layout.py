"""The interface every data layout implements (:class:`Reader`), the registry the
layouts add themselves to, and the checks they share. The layouts
(:mod:`mclx.data.her2st`, :mod:`~mclx.data.stutility`, :mod:`~mclx.data.visium`,
:mod:`~mclx.data.hest`) import this module; :mod:`mclx.data.readers` imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mclx.errors import DataError

LAYOUTS: dict[str, type[Reader]] = {}


def register(cls: type[Reader]) -> type[Reader]:
    """Class decorator: add a reader to :data:`LAYOUTS` under its ``name``."""
    LAYOUTS[cls.name] = cls
    return cls


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

        from mclx.data.arrays import SPOT_DIAMETER_UM

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
        out.attrs["spot_diameter_um"] = SPOT_DIAMETER_UM.get(str(a.uns.get("array")))
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

    from mclx.data.slide import image_size

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
