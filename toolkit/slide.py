"""Slide readers: OpenSlide for WSI formats, PIL for plain JPEG/PNG/TIFF images.

``open_slide(path, mpp=None)`` returns a :class:`Slide` with ``dimensions`` (level-0
width, height), ``mpp`` (µm/px at level 0, or None), ``read(x, y, size, out)`` (RGB
uint8 patch of ``size`` level-0 pixels with top-left (x, y), resized to ``out`` and
zero outside the slide) and ``thumbnail(max_side)``. Resolution math lives here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mclx.errors import DataError

OPENSLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}


class Slide:
    """Base class: subclasses implement ``_region`` and set ``dimensions`` and ``mpp``."""

    path: Path
    dimensions: tuple[int, int]
    mpp: float | None
    backend: str

    def _region(self, x: int, y: int, w: int, h: int, out: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def read(self, x: int, y: int, size: int, out: int | None = None) -> np.ndarray:
        """(out, out, 3) uint8 of the level-0 square [x, x+size) x [y, y+size)."""
        out = out or size
        W, H = self.dimensions
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, W), min(y + size, H)
        patch = np.zeros((out, out, 3), np.uint8)
        if x1 <= x0 or y1 <= y0:
            return patch
        if (x0, y0, x1, y1) == (x, y, x + size, y + size):
            return self._region(x, y, size, size, (out, out))
        scale = out / size  # partly outside: read the inside part, paste it
        ox, oy = round((x0 - x) * scale), round((y0 - y) * scale)
        ow = max(1, min(out - ox, round((x1 - x0) * scale)))
        oh = max(1, min(out - oy, round((y1 - y0) * scale)))
        patch[oy : oy + oh, ox : ox + ow] = self._region(x0, y0, x1 - x0, y1 - y0, (ow, oh))
        return patch

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """RGB thumbnail and its downsample factor (level-0 px per thumbnail px)."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - trivial
        pass


class PILSlide(Slide):
    """A plain image decoded whole into memory (her2st JPEGs, PNG, flat TIFF)."""

    backend = "pil"

    def __init__(self, path: Path, mpp: float | None) -> None:
        from mclx.data.patches import _open, load_image

        self.path = path
        with _open(path) as im:
            self.mpp = mpp or _tiff_mpp(im)
        self.pixels = load_image(path)
        self.dimensions = (self.pixels.shape[1], self.pixels.shape[0])

    def _region(self, x, y, w, h, out):
        from PIL import Image

        crop = self.pixels[y : y + h, x : x + w]
        if (w, h) == tuple(out):
            return crop.copy()
        return np.asarray(Image.fromarray(crop).resize(out, Image.BILINEAR))

    def thumbnail(self, max_side: int = 2048):
        from PIL import Image

        W, H = self.dimensions
        f = max(1.0, max(W, H) / max_side)
        im = Image.fromarray(self.pixels).resize((max(1, round(W / f)), max(1, round(H / f))))
        return np.asarray(im), f


class OpenSlideSlide(Slide):
    """Any format OpenSlide reads; regions come from the best pyramid level."""

    backend = "openslide"

    def __init__(self, path: Path, mpp: float | None) -> None:
        import openslide

        self.path = path
        try:
            self.osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            from mclx.io import describe_file

            what = describe_file(path)
            hint = ", truncated or corrupt?" if what == "a TIFF file" else ""
            msg = f"{path}: OpenSlide cannot read it ({exc}; the file is {what}{hint})"
            raise DataError(msg) from exc
        self.dimensions = tuple(self.osr.dimensions)
        prop = self.osr.properties.get(openslide.PROPERTY_NAME_MPP_X)
        try:
            self.mpp = mpp or (float(prop) if prop else None)
        except ValueError:  # a malformed property: as if absent (--mpp or the spot grid)
            self.mpp = None

    def _region(self, x, y, w, h, out):
        import openslide
        from PIL import Image

        down = w / out[0]
        level = self.osr.get_best_level_for_downsample(max(down, 1.0))
        ds = self.osr.level_downsamples[level]
        size = (max(1, round(w / ds)), max(1, round(h / ds)))
        try:
            im = self.osr.read_region((int(x), int(y)), level, size).convert("RGB")
        except openslide.OpenSlideError as exc:
            msg = f"{self.path}: cannot read region at ({x}, {y}) ({exc})"
            raise DataError(msg) from exc
        if im.size != tuple(out):
            im = im.resize(out, Image.BILINEAR)
        return np.asarray(im)

    def thumbnail(self, max_side: int = 2048):
        import openslide

        W, H = self.dimensions
        f = max(1.0, max(W, H) / max_side)
        try:
            im = self.osr.get_thumbnail((max(1, round(W / f)), max(1, round(H / f))))
        except openslide.OpenSlideError as exc:
            msg = f"{self.path}: cannot read the slide's pixels (truncated or corrupt?) ({exc})"
            raise DataError(msg) from exc
        im = im.convert("RGB")
        return np.asarray(im), W / im.size[0]

    def close(self) -> None:
        self.osr.close()


def _tiff_mpp(im) -> float | None:
    """µm/px from TIFF resolution tags (unit 2 = inch, 3 = cm), when present."""
    tags = getattr(im, "tag_v2", None)
    if not tags or 282 not in tags:
        return None
    try:
        res, unit = float(tags[282]), tags.get(296, 2)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not res > 0 or unit not in (2, 3):
        return None
    return (25400.0 if unit == 2 else 10000.0) / res


def _is_tiled_tiff(path: Path) -> bool:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return tf.pages[0].is_tiled
    except Exception:
        return False


def open_slide(path: str | os.PathLike, *, mpp: float | None = None) -> Slide:
    """Open a slide with OpenSlide (WSI formats, tiled TIFF) or PIL (plain images)."""
    from mclx.artifacts import require_file

    path = require_file(path, "slide", nonempty=True, error=DataError)
    suffix = path.suffix.lower()
    if suffix in OPENSLIDE_SUFFIXES or (suffix in (".tif", ".tiff") and _is_tiled_tiff(path)):
        return OpenSlideSlide(path, mpp)
    return PILSlide(path, mpp)


def write_pyramidal_tiff(
    image: np.ndarray, path: str | os.PathLike, *, mpp: float, tile: int = 256, levels: int = 4
) -> Path:
    """Write an RGB array as a tiled, pyramidal, deflate-compressed TIFF with resolution
    tags (what OpenSlide's generic-tiff reader expects); for tests and demos."""
    import tifffile
    from PIL import Image

    from mclx.io import atomic_path

    path = Path(path)
    res = (1e4 / mpp, 1e4 / mpp)  # pixels per centimetre
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=False) as tw:
        level = image
        for i in range(levels):
            tw.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                resolution=(res[0] / 2**i, res[1] / 2**i),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
            )
            h, w = level.shape[:2]
            if min(h, w) // 2 < tile:
                break
            level = np.asarray(Image.fromarray(level).resize((w // 2, h // 2), Image.BILINEAR))
    return path
