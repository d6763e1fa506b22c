"""Where tiles go: a grid over detected tissue, or given spot coordinates.

Tissue is found on a thumbnail: pen ink (blue, green, black) and near-black pixels set
aside, then an optical-density floor: above the image's own glass where the histogram is
bimodal (glass and tissue, Otsu's criterion) with an unsaturated peak, else an absolute
floor that H&E glass never reaches, so an image that is all tissue is not split in two
(Otsu's threshold itself split pale from dark tissue); where the peak is glass, pixels
above it by as much as pale stroma and clearly coloured are tissue too (the pale tissue of
low-contrast legacy-ST images); small objects removed and small holes filled
(scikit-image). Tiles are squares of ``size`` level-0 pixels (the patch size scaled by
checkpoint µm/px over slide µm/px), described by their centres in level-0 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mclx.errors import DataError


@dataclass
class Tiles:
    """Tile centres (N, 2) as level-0 (x, y), their ids, and the tile side in level-0 px;
    ``views``: the level-0 sides of the wider fields of view read around each tile too
    (a ``--context-fov`` model's), stacked after the tile on the channel axis."""

    centres: np.ndarray
    ids: list[str]
    size: int
    tissue_tiled: float | None = None  # share of the tissue mask the tiles cover (grid)
    views: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def origin(self, i: int, size: int | None = None) -> tuple[int, int]:
        """Top-left level-0 pixel of tile ``i`` (PIL ``crop`` semantics, as in training),
        or of a square of ``size`` px around its centre."""
        size = self.size if size is None else size
        cx, cy = np.floor(self.centres[i]).astype(np.int64)
        return int(cx - size // 2), int(cy - size // 2)

    def crops(self, i: int) -> list[tuple[int, int, int]]:
        """The level-0 squares (x, y, side) read for tile ``i``: itself, then its views."""
        return [(*self.origin(i, s), s) for s in (self.size, *self.views)]


# Pen ink, as RGB rules (blue: R < r, G < g, B > b; green: R < r, G > g, B > b), the
# thresholds of deep-histopath's filter_blue_pen / filter_green_pen (histolab uses them
# too). On the five her2st H&E images they flag 1-2% of tissue pixels, never a tile.
BLUE_PEN = ((60, 120, 190), (120, 170, 200), (175, 210, 230), (145, 180, 210), (37, 95, 160),
            (30, 65, 130), (130, 155, 180), (40, 35, 85), (30, 20, 65), (90, 90, 140),
            (60, 60, 120), (110, 110, 175))  # fmt: skip
GREEN_PEN = ((150, 160, 140), (70, 110, 110), (45, 115, 100), (30, 75, 60), (195, 220, 210),
             (225, 230, 225), (170, 210, 200), (20, 30, 20), (50, 60, 40), (30, 50, 35),
             (65, 70, 60), (100, 110, 105), (165, 180, 180), (140, 140, 150),
             (185, 195, 195))  # fmt: skip
GRID_BLOCK = 1 << 20  # grid places weighed at once: ~50 MB of temporaries
# thumbnail px: a pen stroke (>= 0.3 mm) is wider on any thumbnail of <= 2048 px per
# 60 mm; the nuclei that match the blue and green rules on C2 are 1-3 px wide
INK_WIDTH = 5
DARK = 0.2  # HSV value below which a pixel is black ink, shadow or scanner black, not H&E


def ink_mask(thumb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or black pen ink (and near-black background) on an RGB
    thumbnail: areas at least :data:`INK_WIDTH` px across (a stroke; not the scattered
    dark-blue nuclei of a haematoxylin-heavy stain, which the colour rules also match),
    grown by one pixel to take the stroke's edge blended with the glass."""
    from scipy.ndimage import binary_dilation, binary_opening

    r, g, b = (thumb[..., i].astype(np.int16) for i in range(3))
    ink = thumb[..., :3].max(-1) < DARK * 255
    for R, G, B in BLUE_PEN:
        ink |= (r < R) & (g < G) & (b > B)
    for R, G, B in GREEN_PEN:
        ink |= (r < R) & (g > G) & (b > B)
    ink = binary_opening(ink, np.ones((INK_WIDTH, INK_WIDTH), bool))
    return binary_dilation(ink, np.ones((3, 3), bool))


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation, (max - min) / max of the channels (0 for black), as float32."""
    rgb = rgb[..., :3]
    hi = rgb.max(-1).astype(np.float32)
    lo = rgb.min(-1).astype(np.float32)
    return np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)


# Glass, learnt from the five her2st H&E images (C2-C6, thumbnails): its mean optical
# density stays below 0.093 (99.9th percentile; its peak at 0.02-0.06, so at most 0.05
# above the peak) and its HSV saturation below 0.093 (pinkish glass), while pale stroma
# lies about 0.09 above the glass and above OD 0.1.
OD_FLOOR = 0.1  # mean optical density over R, G, B: below it a pixel is glass
ABOVE_GLASS = 0.06  # OD above the image's own glass peak, where the image has glass
SAT_FLOOR = 0.05  # HSV saturation: below it a pixel is grey (dust, shadow), not H&E
GLASS_SAT = 0.1  # the histogram's peak is glass when its pixels are less saturated
BIMODAL = 0.7  # Otsu's between-class / total variance: one normal hump gives 2/pi ~ 0.64
_OD_LUT = -np.log10(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density of R, G and B, ``-log10(I / 255)`` (0 for white), float32."""
    return _OD_LUT[rgb[..., :3]].mean(-1)


def _between_class_ratio(values: np.ndarray, t: float) -> float:
    """Otsu's criterion at ``t``: between-class variance over total variance (0..1)."""
    lo = values <= t
    w0 = float(lo.mean())
    var = float(values.var())
    if not 0 < w0 < 1 or var == 0:
        return 0.0
    gap = float(values[lo].mean() - values[~lo].mean())
    return w0 * (1 - w0) * gap * gap / var


PALE_SAT = 0.12  # HSV saturation of pale stained tissue (legacy-ST MOB: 0.13-0.14) over
# glass (her2st's below 0.093): with it, pixels 0.06 above the glass peak are tissue


def glass_peak(od: np.ndarray, sat: np.ndarray) -> float | None:
    """The optical density of the histogram's peak when it is glass (unsaturated)."""
    hist, edges = np.histogram(od, bins=300, range=(0.0, 1.5))
    i = int(hist.argmax())
    peak = float(edges[i] + edges[i + 1]) / 2
    near = np.abs(od - peak) <= 0.01
    return peak if near.any() and float(np.median(sat[near])) < GLASS_SAT else None


def tissue_threshold(od: np.ndarray, sat: np.ndarray) -> float:
    """The optical density above which a pixel is tissue (``od``, ``sat``: the values of
    the pixels that are not ink).

    When the histogram is bimodal (Otsu's between-class share of the variance at least
    :data:`BIMODAL`) and its peak is glass (unsaturated), :data:`ABOVE_GLASS` over that
    peak: the image's own glass, clean or dim. Otherwise (tissue only, glass only, no
    clear glass peak) the absolute :data:`OD_FLOOR`. Otsu's threshold itself is never
    used to cut, so an image with little or no glass is not split in two.
    """
    from skimage.filters import threshold_otsu

    hist, edges = np.histogram(od, bins=300, range=(0.0, 1.5))
    i = int(hist.argmax())
    peak = float(edges[i] + edges[i + 1]) / 2
    near = np.abs(od - peak) <= 0.01
    if not near.any() or float(np.median(sat[near])) >= GLASS_SAT:
        return OD_FLOOR  # the commonest colour is stained: no glass to learn from
    if _between_class_ratio(od, float(threshold_otsu(od))) < BIMODAL:
        return OD_FLOOR
    return peak + ABOVE_GLASS


def tissue_mask(thumb: np.ndarray, *, min_object_frac: float = 1e-3) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: pixels that are not pen ink or near-black,
    darker than glass (optical density above :func:`tissue_threshold`) and not grey
    (HSV saturation above :data:`SAT_FLOOR`), cleaned of small objects and holes. Holds
    on images with any share of tissue, 0 to 100 %: no tissue gives an empty mask."""
    from skimage.morphology import remove_small_holes, remove_small_objects

    sat = saturation(thumb)
    od = optical_density(thumb)
    clean = ~ink_mask(thumb)
    if not clean.any():
        return np.zeros(sat.shape, bool)  # all ink
    t = tissue_threshold(od[clean], sat[clean])
    mask = clean & (od > t) & (sat > SAT_FLOOR)
    glass = glass_peak(od[clean], sat[clean])
    if glass is not None and glass + ABOVE_GLASS < t:  # pale but stained, over clear glass
        mask |= clean & (od > glass + ABOVE_GLASS) & (sat > PALE_SAT)
    area = max(16, int(min_object_frac * mask.size))
    mask = remove_small_objects(mask, max_size=area)
    return remove_small_holes(mask, max_size=area) & clean


def slide_tissue(slide, max_side: int = 2048) -> tuple[np.ndarray, float]:
    """The slide's tissue mask on a thumbnail and the thumbnail's downsample factor;
    :class:`DataError` when there is no tissue."""
    thumb, f = slide.thumbnail(max_side)
    mask = tissue_mask(thumb)
    if not mask.any():
        msg = (
            f"{slide.path}: no tissue found (nothing darker and more coloured than glass on "
            "the thumbnail, ink excluded)"
        )
        raise DataError(msg)
    return mask, f


def _tissue_fraction(sat: np.ndarray, f: float, gx, gy, size: int) -> np.ndarray:
    """Fraction of tissue in each tile (top-left gx, gy) from the mask's summed-area
    table ``sat`` (one row and column of zeros in front)."""
    mh, mw = sat.shape[0] - 1, sat.shape[1] - 1
    x0 = np.clip(np.floor(gx / f).astype(int), 0, mw)
    y0 = np.clip(np.floor(gy / f).astype(int), 0, mh)
    x1 = np.clip(np.ceil((gx + size) / f).astype(int), 0, mw)
    y1 = np.clip(np.ceil((gy + size) / f).astype(int), 0, mh)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]) / area


def grid_tiles(
    slide,
    *,
    size: int,
    stride: int | None = None,
    min_tissue: float = 0.5,
    tissue: tuple[np.ndarray, float] | None = None,
    max_tiles: int | None = None,
) -> Tiles:
    """A grid of ``size`` level-0 px tiles every ``stride`` px (default ``size``), kept
    where at least ``min_tissue`` of the tile is tissue on the thumbnail mask
    (``tissue``: :func:`slide_tissue`'s result, computed here when not given). Rows are
    counted in blocks, so a grid of any size costs bounded memory; more than
    ``max_tiles`` kept tiles is refused."""
    stride = stride or size
    mask, f = tissue if tissue is not None else slide_tissue(slide)
    W, H = slide.dimensions
    xs = np.arange(0, max(W - size, 0) + 1, stride)
    ys = np.arange(0, max(H - size, 0) + 1, stride)
    sat = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    rows = max(1, GRID_BLOCK // len(xs))
    kept_x, kept_y, n = [], [], 0
    for i in range(0, len(ys), rows):
        gx, gy = (a.ravel() for a in np.meshgrid(xs, ys[i : i + rows]))
        keep = _tissue_fraction(sat, f, gx, gy, size) >= min_tissue
        kept_x.append(gx[keep])
        kept_y.append(gy[keep])
        n += int(keep.sum())
        if max_tiles is not None and n > max_tiles:
            msg = (
                f"{slide.path}: more than --max-tiles {max_tiles:,} tiles of tissue ({size} px "
                f"every {stride} px on the {W}x{H} slide, {len(xs) * len(ys):,} grid places); "
                "raise --max-tiles or the --stride"
            )
            raise DataError(msg)
    if not n:
        msg = f"{slide.path}: no tile has {min_tissue:.0%} tissue at tile size {size} px"
        raise DataError(msg)
    gx, gy = np.concatenate(kept_x), np.concatenate(kept_y)
    centres = np.stack([gx + size // 2, gy + size // 2], 1).astype(np.float64)
    ids = [f"tile_{int(x)}_{int(y)}" for x, y in zip(gx, gy)]
    return Tiles(centres, ids, size, tissue_tiled=tissue_covered(mask, f, gx, gy, size))


def tissue_covered(mask: np.ndarray, f: float, gx, gy, size: int) -> float:
    """Share of the thumbnail's tissue pixels under at least one tile (top-left gx, gy,
    ``size`` level-0 px; ``f`` the thumbnail's downsample): tiles counted on a
    difference array, so overlapping strides and millions of tiles cost one pass."""
    mh, mw = mask.shape
    x0 = np.clip(np.floor(np.asarray(gx) / f).astype(int), 0, mw)
    y0 = np.clip(np.floor(np.asarray(gy) / f).astype(int), 0, mh)
    x1 = np.clip(np.ceil((np.asarray(gx) + size) / f).astype(int), 0, mw)
    y1 = np.clip(np.ceil((np.asarray(gy) + size) / f).astype(int), 0, mh)
    diff = np.zeros((mh + 1, mw + 1), np.int64)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(diff, (ys, xs), sign)
    covered = diff.cumsum(0).cumsum(1)[:mh, :mw] > 0
    tissue = int(mask.sum())
    return float((covered & mask).sum() / tissue) if tissue else 0.0


def spot_tiles(
    slide, spots: pd.DataFrame, *, size: int, source: str = "spots", kind: str = ""
) -> Tiles:
    """Tiles centred on given spots; every spot must lie on the slide (Visium positions
    on a downscaled image: the message says they need its scale factor)."""
    W, H = slide.dimensions
    xy = spots[["x", "y"]].to_numpy(np.float64)
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= W) | (xy[:, 1] >= H)
    if outside.any():
        first = spots["id"].iloc[int(np.flatnonzero(outside)[0])]
        msg = (
            f"{source}: {int(outside.sum())} spots lie outside the {W}x{H} slide "
            f"{slide.path.name} (first: {first})"
        ) + (_visium_hint(slide.path) if kind == "visium" else "")
        raise DataError(msg)
    return Tiles(xy, spots["id"].astype(str).tolist(), size)


def _visium_hint(image) -> str:
    """Why Visium positions miss an image: they are full-resolution pixels."""
    from mclx.data.spaceranger import downscaled_hint

    return downscaled_hint(image) or (
        "; Visium positions are full-resolution pixels: for Space Ranger's hires or lowres "
        "image they need its scale factor (scalefactors_json.json), so give the Space "
        "Ranger folder instead (mclx infer OUTS/)"
    )
