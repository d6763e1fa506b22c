"""Resolution math shared by training patches and whole-slide tiles: which µm/px a slide's
metadata is believed to have, and how many level-0 pixels cover a model patch.

:func:`tile_size` is the one rule that turns the checkpoint's µm/px and a slide's (or a
section's) into the side of a tile in level-0 pixels, so that training, evaluation and
inference cut the same tissue; :func:`check_resampling` refuses a ratio no microscope
gives (a wrong µm/px, not a slide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mclx.errors import DataError

# µm per level-0 pixel that a microscope image can have (80x scans ~0.1; low-resolution
# legacy-ST images ~6); outside this, a resolution from metadata is not believed
MPP_RANGE = (0.05, 20.0)
# densities that ordinary software writes into any image (screen, print, scanner
# defaults): a resolution tag with one of these says nothing about a microscope
ROUND_DPI = (72, 96, 100, 120, 144, 150, 180, 200, 240, 300, 360, 400, 600, 720, 1200, 2400,
             4800, 9600)  # fmt: skip


@dataclass(frozen=True)
class Resolution:
    """µm per level-0 pixel (None when unknown), its ``source`` ("--mpp", "aperio
    metadata", "resolution tag", "none") and, when metadata held a value that was set
    aside, what it said (``found``)."""

    mpp: float | None
    source: str = "none"
    found: str = ""


def judge(mpp: float, source: str, *, dpi: float | None = None) -> Resolution:
    """A µm/px from metadata, believed only when a microscope could have produced it:
    within :data:`MPP_RANGE` and (for resolution tags, ``dpi`` given) not a round
    screen/print density."""
    screen = [d for d in ROUND_DPI if dpi is not None and abs(dpi / d - 1) < 1e-3]
    if screen:
        found = f"{source} {screen[0]} dpi = {mpp:.4g} µm/px, a screen/print density"
        return Resolution(None, found=found)
    lo, hi = MPP_RANGE
    if not (math.isfinite(mpp) and lo <= mpp <= hi):
        said = f"{mpp:.4g}" if abs(mpp) < 1000 else f"{mpp:.0f}"
        return Resolution(None, found=f"{source} {said} µm/px, outside {lo:g}-{hi:g} µm/px")
    return Resolution(float(mpp), source)


def given(mpp: float | None) -> Resolution | None:
    return Resolution(float(mpp), "--mpp") if mpp else None


MPP_TOLERANCE = 0.02  # slides within 2% of the training µm/px are read without resampling
MAX_DOWNSAMPLE = 32.0  # level-0 px per model px: an 80x scan for a 2.5 µm/px model
# model px per level-0 px: beyond, tiles are blur and their number explodes; legacy-ST
# images (~4.4 µm/px) read for a spot-sized field (100 µm over 224 px, 0.45 µm/px) are ~10x
MAX_UPSAMPLE = 16.0


def tile_size(pre, slide_mpp: float | None, source: str, found: str = "") -> int:
    """Level-0 pixels per tile so that tiles match the checkpoint's µm/px."""
    if pre.mpp is None or slide_mpp is None:
        if pre.mpp is not None:
            why = found or "no resolution in its metadata, no spot grid"
            msg = (
                f"{source}: µm/px unknown ({why}); pass --mpp (µm per level-0 pixel) "
                "or --spots on an array grid"
            )
            raise DataError(msg)
        return pre.patch_size
    ratio = pre.mpp / slide_mpp
    if abs(ratio - 1) <= MPP_TOLERANCE:
        return pre.patch_size
    return max(1, round(pre.patch_size * ratio))


def check_resampling(size: int, pre, slide_mpp: float | None, source: str) -> float:
    """Level-0 px per model px of ``size``-px tiles; refused beyond the bounds (judged
    on the µm/px ratio, which the tile's whole pixels round)."""
    factor = size / pre.patch_size
    exact = pre.mpp / slide_mpp if pre.mpp and slide_mpp else factor
    up, down = 1 / exact, exact
    if down > MAX_DOWNSAMPLE or up > MAX_UPSAMPLE:
        how = f"{down:.3g}x down" if down > 1 else f"{up:.3g}x up"
        limit = MAX_DOWNSAMPLE if down > 1 else MAX_UPSAMPLE
        msg = (
            f"{source}: tiles would be resampled {how} (slide {slide_mpp:.4g} µm/px, model "
            f"{pre.mpp:.4g} µm/px; limit {limit:g}x); is the slide's µm/px right? pass --mpp"
        )
        raise DataError(msg)
    return factor
