"""Slide readers, chosen by content: OpenSlide for what it detects (WSI formats, tiled
TIFF, DICOM), PIL for plain images (JPEG, PNG, flat TIFF), whatever the file's suffix.

``open_slide(path, mpp=None)`` returns a :class:`Slide` with ``dimensions`` (level-0
width, height), ``resolution`` (µm/px at level 0 and where it came from, or None with
what the metadata said when that was not a microscope's resolution), ``vendor``,
``read(x, y, size, out)`` (RGB uint8 patch of ``size`` level-0 pixels with top-left
(x, y), resized to ``out``, zero outside the slide; read from the pyramid level nearest
above the resolution asked for) and ``thumbnail(max_side)``. Headers only are read when
a slide is opened: a plain image is decoded at its first pixel read. A folder is read as
a Space Ranger ``outs/`` folder when it has ``spatial/`` tissue positions (its
full-resolution image, else its hires image: :mod:`mclx.data.spaceranger`), else as a
DICOM whole-slide image (any of its instances opens the series).
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np

from mclx.data.resolution import Resolution, given, judge
from mclx.errors import DataError, short

MAX_PIXELS = 2_000_000_000  # her2st images are ~92 Mpx, above PIL's bomb guard


def open_image(path: Path, unknown: str = "not an image PIL can read"):
    """A PIL image, header read only; one-line errors for what PIL cannot open."""
    from PIL import Image, UnidentifiedImageError

    from mclx.artifacts import require_file

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    require_file(path, "image", nonempty=True, error=DataError)
    try:
        return Image.open(path)
    except UnidentifiedImageError as exc:
        from mclx.artifacts import describe_file

        msg = f"{path}: {unknown} (the file is {describe_file(path)})"
        raise DataError(msg) from exc
    except MemoryError:
        raise
    except Exception as exc:  # OSError, and SyntaxError / struct.error from bad headers
        msg = f"{path}: cannot open image ({short(exc)})"
        raise DataError(msg) from exc


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels."""
    with open_image(Path(path)) as im:
        return im.size


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Whole image as an RGB uint8 array (H, W, 3)."""
    path = Path(path)
    with open_image(path) as im:
        try:
            im.load()
            return np.asarray(im.convert("RGB"))
        except MemoryError:
            raise
        except Exception as exc:  # OSError, SyntaxError, ValueError, struct.error, ...
            msg = f"{path}: truncated or corrupt image ({short(exc)})"
            raise DataError(msg) from exc


class Slide:
    """Base class: subclasses implement ``_region`` and set ``dimensions``,
    ``resolution`` and ``vendor``."""

    path: Path
    dimensions: tuple[int, int]
    resolution: Resolution
    vendor: str
    backend: str
    level_downsamples: tuple[float, ...] = (1.0,)
    spaceranger = None  # what a Space Ranger folder given as the slide read (its spots)

    @property
    def mpp(self) -> float | None:
        return self.resolution.mpp

    def level_for(self, downsample: float) -> int:
        """The pyramid level to read for ``downsample`` level-0 px per output px: the
        coarsest one that is not coarser than asked for (level 0 without a pyramid)."""
        return 0

    def decoded_bytes(self) -> int:
        """Memory the reader holds once pixels are read (a plain image: all of it)."""
        return 0

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
    """A plain image; its header is read when opened, its pixels decoded whole into
    memory at the first read (her2st JPEGs, PNG, flat TIFF)."""

    backend = "pil"

    def __init__(self, path: Path, mpp: float | None) -> None:

        self.path = path
        with open_image(path, unknown="neither OpenSlide nor PIL can read it") as im:
            self.dimensions = tuple(im.size)
            self.vendor = (im.format or "image").lower()
            self.resolution = given(mpp) or _density(im)
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def pixels(self) -> np.ndarray:
        with self._lock:  # reader threads: decode once
            if self._pixels is None:
                self._pixels = load_image(self.path)
                self.dimensions = (self._pixels.shape[1], self._pixels.shape[0])
        return self._pixels

    def decoded_bytes(self) -> int:
        W, H = self.dimensions
        return 3 * W * H

    def _region(self, x, y, w, h, out):
        from PIL import Image

        crop = self.pixels[y : y + h, x : x + w]
        if (w, h) == tuple(out):
            return crop.copy()
        return np.asarray(Image.fromarray(crop).resize(out, Image.BILINEAR))

    def thumbnail(self, max_side: int = 2048):
        from PIL import Image

        pixels = self.pixels
        W, H = self.dimensions
        f = max(1.0, max(W, H) / max_side)
        im = Image.fromarray(pixels).resize((max(1, round(W / f)), max(1, round(H / f))))
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
            from mclx.artifacts import describe_file

            what = describe_file(path)
            hint = ", truncated or corrupt?" if what == "a TIFF file" else ""
            msg = f"{path}: OpenSlide cannot read it ({exc}; the file is {what}{hint})"
            raise DataError(msg) from exc
        self.dimensions = tuple(self.osr.dimensions)
        self.level_downsamples = tuple(float(d) for d in self.osr.level_downsamples)
        self.vendor = self.osr.properties.get(openslide.PROPERTY_NAME_VENDOR, "openslide")
        self.resolution = given(mpp) or self._metadata_resolution()

    def _metadata_resolution(self) -> Resolution:
        import openslide

        prop = self.osr.properties.get(openslide.PROPERTY_NAME_MPP_X)
        if not prop:
            return Resolution(None)
        try:
            value = float(prop)
        except ValueError:  # a malformed property: as if absent (--mpp or the spot grid)
            return Resolution(None, found=f"{self.vendor} metadata mpp-x {prop!r}, not a number")
        if self.vendor == "generic-tiff":  # from the resolution tags any software writes
            return judge(value, "resolution tag", dpi=25400.0 / value if value > 0 else None)
        return judge(value, f"{self.vendor} metadata")

    def level_for(self, downsample: float) -> int:
        return int(self.osr.get_best_level_for_downsample(max(downsample, 1.0)))

    def _region(self, x, y, w, h, out):
        import openslide
        from PIL import Image

        level = self.level_for(w / out[0])
        ds = self.level_downsamples[level]
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


def _density(im) -> Resolution:
    """µm/px from an image's pixel density: TIFF resolution tags (unit 2 = inch, 3 = cm)
    or the PNG pHYs / JPEG JFIF density that PIL reports as ``dpi``."""
    dpi = None
    tags = getattr(im, "tag_v2", None)
    try:
        if tags and 282 in tags:
            res, unit = float(tags[282]), tags.get(296, 2)
            dpi = res if unit == 2 else res * 2.54 if unit == 3 else None
        elif "dpi" in im.info:
            dpi = float(im.info["dpi"][0])
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        dpi = None
    if dpi is None or not (math.isfinite(dpi) and dpi > 0):
        return Resolution(None)
    return judge(25400.0 / dpi, "resolution tag", dpi=dpi)


def detect_format(path: Path) -> str | None:
    """OpenSlide's name for the file's format ("aperio", "dicom", "generic-tiff", ...),
    or None when OpenSlide does not read it."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        return None


def _dicom_instance(folder: Path) -> Path:
    """One DICOM instance of the whole-slide image in ``folder`` (OpenSlide then finds
    the series' other instances beside it)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    dicom = [p for p in files if detect_format(p) == "dicom"]
    if not dicom:
        msg = (
            f"{folder}: is a folder; a folder is read as a DICOM whole-slide image, and none "
            f"of its {len(files)} files is DICOM"
        )
        raise DataError(msg)
    return dicom[0]


def _spaceranger_slide(folder: Path, mpp: float | None) -> Slide | None:
    """A Space Ranger outs folder's image (:mod:`mclx.data.spaceranger`) as the slide,
    with the µm/px of its spot diameter when neither --mpp nor its metadata gives one;
    ``slide.spaceranger`` says what was read. None when ``folder`` is not one."""
    from mclx.data.spaceranger import spaceranger_image

    found = spaceranger_image(folder)
    if found is None:
        return None
    slide = open_slide(found.image, mpp=mpp)
    if slide.resolution.mpp is None and found.mpp is not None:
        source = f"spot diameter ({found.kind} image, scalefactors_json.json)"
        slide.resolution = Resolution(found.mpp, source, slide.resolution.found)
    slide.spaceranger = found
    return slide


def open_slide(path: str | os.PathLike, *, mpp: float | None = None) -> Slide:
    """Open a slide by its content: OpenSlide when it detects the format, else PIL."""
    from mclx.artifacts import require_file

    path = Path(path)
    if path.is_dir():
        return _spaceranger_slide(path, mpp) or OpenSlideSlide(_dicom_instance(path), mpp)
    path = require_file(path, "slide", nonempty=True, error=DataError)
    if detect_format(path):
        return OpenSlideSlide(path, mpp)
    return PILSlide(path, mpp)


def write_pyramidal_tiff(
    image: np.ndarray,
    path: str | os.PathLike,
    *,
    mpp: float,
    tile: int = 256,
    levels: int = 4,
    compression: str = "zlib",
) -> Path:
    """Write an RGB array as a tiled, pyramidal TIFF with resolution tags (what
    OpenSlide's generic-tiff reader expects); for tests, demos and benchmarks.
    ``compression``: "zlib" (deflate), or "jpeg" as scanners write (needs imagecodecs)."""
    import tifffile
    from PIL import Image

    from mclx.files import atomic_path

    path = Path(path)
    res = (1e4 / mpp, 1e4 / mpp)  # pixels per centimetre
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=False) as tw:
        level = image
        for i in range(levels):
            tw.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                resolution=(res[0] / 2**i, res[1] / 2**i),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
            )
            h, w = level.shape[:2]
            if min(h, w) // 2 < tile:
                break
            level = np.asarray(Image.fromarray(level).resize((w // 2, h // 2), Image.BILINEAR))
    return path


SIGNATURE_SIDE = 16  # the slide's signature: its thumbnail, grey, this many px a side
SIGNATURE_TOLERANCE = 20  # grey levels: a re-encoded copy differs by 1, another slide by 70+


def slide_signature(slide) -> dict:
    """What the predictions record of their slide, to know it again: its file name, its
    level-0 size and a 16 x 16 grey thumbnail (what a re-encoded or converted copy keeps,
    what another slide of the same size does not)."""
    from PIL import Image

    thumb, _ = slide.thumbnail(256)
    small = Image.fromarray(np.ascontiguousarray(thumb[..., :3])).convert("L")
    grey = np.asarray(small.resize((SIGNATURE_SIDE, SIGNATURE_SIDE), Image.BOX), np.uint8)
    return {
        "slide_name": Path(slide.path).name,
        "slide_size": [int(v) for v in slide.dimensions],
        "slide_thumbnail": grey.ravel().tolist(),
    }


def slide_mismatch(recorded: dict, slide) -> str | None:
    """Why ``slide`` is not the one ``recorded`` (:func:`slide_signature`'s keys of
    ``uns["mclx"]``) describes: another level-0 size or another picture; None when it is
    (or when nothing was recorded: predictions of an older mclx)."""
    if "slide_size" not in recorded or "slide_thumbnail" not in recorded:
        return None
    W, H = (int(v) for v in np.asarray(recorded["slide_size"]).ravel()[:2])
    name = str(recorded.get("slide_name", "?"))
    if (W, H) != tuple(int(v) for v in slide.dimensions):
        w, h = slide.dimensions
        return f"its {w} x {h} px are not the {W} x {H} px of {name}"
    want = np.asarray(recorded["slide_thumbnail"], np.int16).ravel()
    got = np.asarray(slide_signature(slide)["slide_thumbnail"], np.int16)
    if want.shape != got.shape or int(np.abs(want - got).max()) > SIGNATURE_TOLERANCE:
        return f"its picture is not {name}'s (same {W} x {H} px, other content)"
    return None
