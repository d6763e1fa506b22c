"""Where tiles go: a grid over detected tissue, or given spot coordinates.

Tissue is found on a thumbnail: pen ink (blue, green, black) and near-black pixels set
aside, Otsu threshold on the HSV saturation of the rest (near-white glass is not
saturated), then small objects removed and small holes filled (scikit-image). Tiles are
squares of ``size`` level-0 pixels (the patch size scaled by checkpoint µm/px over slide
µm/px), described by their centres in level-0 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mclx.errors import DataError


@dataclass
class Tiles:
    """Tile centres (N, 2) as level-0 (x, y), their ids, and the tile side in level-0 px."""

    centres: np.ndarray
    ids: list[str]
    size: int

    def __len__(self) -> int:
        return len(self.ids)

    def origin(self, i: int) -> tuple[int, int]:
        """Top-left level-0 pixel of tile ``i`` (PIL ``crop`` semantics, as in training)."""
        cx, cy = np.floor(self.centres[i]).astype(np.int64)
        return int(cx - self.size // 2), int(cy - self.size // 2)


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
DARK = 0.2  # HSV value below which a pixel is black ink, shadow or scanner black, not H&E


def ink_mask(thumb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or black pen ink (and near-black background) on an RGB
    thumbnail, grown by one pixel to take the stroke's edge blended with the glass."""
    from scipy.ndimage import binary_dilation

    r, g, b = (thumb[..., i].astype(np.int16) for i in range(3))
    ink = thumb[..., :3].max(-1) < DARK * 255
    for R, G, B in BLUE_PEN:
        ink |= (r < R) & (g < G) & (b > B)
    for R, G, B in GREEN_PEN:
        ink |= (r < R) & (g > G) & (b > B)
    return binary_dilation(ink, np.ones((3, 3), bool))


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation, (max - min) / max of the channels (0 for black), as float32."""
    rgb = rgb[..., :3]
    hi = rgb.max(-1).astype(np.float32)
    lo = rgb.min(-1).astype(np.float32)
    return np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)


def tissue_mask(thumb: np.ndarray, *, min_object_frac: float = 1e-3) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: saturated pixels (Otsu threshold on the
    HSV saturation of what is not ink) that are not pen ink or near-black, cleaned of
    small objects and holes. Near-white glass is unsaturated and falls out."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    sat = saturation(thumb)
    clean = ~ink_mask(thumb)
    values = sat[clean]
    if not values.size or float(values.max() - values.min()) < 0.05:
        return np.zeros(sat.shape, bool)  # flat image (or all ink): nothing to threshold
    mask = clean & (sat > max(threshold_otsu(values), 0.05))
    area = max(16, int(min_object_frac * mask.size))
    mask = remove_small_objects(mask, max_size=area)
    return remove_small_holes(mask, max_size=area) & clean


def slide_tissue(slide, max_side: int = 2048) -> tuple[np.ndarray, float]:
    """The slide's tissue mask on a thumbnail and the thumbnail's downsample factor;
    :class:`DataError` when there is no tissue."""
    thumb, f = slide.thumbnail(max_side)
    mask = tissue_mask(thumb)
    if not mask.any():
        msg = f"{slide.path}: no tissue found (saturation threshold on the thumbnail, ink excluded)"
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
    return Tiles(centres, ids, size)


def spot_tiles(slide, spots: pd.DataFrame, *, size: int, source: str = "spots") -> Tiles:
    """Tiles centred on given spots; every spot must lie on the slide."""
    W, H = slide.dimensions
    xy = spots[["x", "y"]].to_numpy(np.float64)
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= W) | (xy[:, 1] >= H)
    if outside.any():
        first = spots["id"].iloc[int(np.flatnonzero(outside)[0])]
        msg = (
            f"{source}: {int(outside.sum())} spots lie outside the {W}x{H} slide "
            f"{slide.path.name} (first: {first})"
        )
        raise DataError(msg)
    return Tiles(xy, spots["id"].astype(str).tolist(), size)
