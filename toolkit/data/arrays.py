"""Spot arrays: how far apart array coordinates are on the glass, and the µm/px that the
pixel coordinates of a section's spots imply.

- ``1k``: legacy ST (her2st): every integer (x, y), 200 µm per step (Ståhl et al. 2016).
- ``2k``: legacy ST's denser array (STUtility's MOB data): x + y always even (a square
  grid turned 45°); the nearest spots, (x ± 1, y ± 1), are 141 µm apart (STUtility's
  ``min.spot.distance``), so one array step is 100 µm.
- ``visium``: 10x Visium, hexagonal: spots at ``array_col`` steps of 2 are 100 µm apart,
  rows 100·√3/2 µm apart (x = array_col, y = array_row).

The estimate regresses pixels on array coordinates (least squares, each axis with more
than one value) and divides the summed µm per step by the summed pixels per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

ArrayName = Literal["1k", "2k", "visium"]


@dataclass(frozen=True)
class SpotArray:
    """An array design: µm per step of the x and y array coordinates."""

    name: str
    step_um: tuple[float, float]
    staggered: bool


# a spot's diameter on each array (legacy ST: Ståhl et al. 2016; Visium: 10x Genomics)
SPOT_DIAMETER_UM: dict[str, float] = {"1k": 100.0, "2k": 100.0, "visium": 55.0}

ARRAYS: dict[str, SpotArray] = {
    "1k": SpotArray("1k", (200.0, 200.0), staggered=False),
    "2k": SpotArray("2k", (100.0, 100.0), staggered=True),
    "visium": SpotArray("visium", (50.0, 100.0 * math.sqrt(3) / 2), staggered=True),
}


def detect_st_array(x: np.ndarray, y: np.ndarray) -> str:
    """``2k`` when every spot has x + y of one parity and neighbouring columns are both
    used (the staggered 2k layout), else ``1k``."""
    x, y = np.asarray(x, np.int64), np.asarray(y, np.int64)
    if len(x) > 1 and len(np.unique((x + y) % 2)) == 1 and len(np.unique(x % 2)) == 2:
        return "2k"
    return "1k"


def estimate_mpp(
    array_xy: np.ndarray, pixel_xy: np.ndarray, array: str | SpotArray = "1k"
) -> float | None:
    """µm/px of the image the pixel coordinates refer to (None when the spots do not span
    two array positions on either axis, or the pixels do not move with them)."""
    spec = ARRAYS[array] if isinstance(array, str) else array
    a = np.asarray(array_xy, np.float64)
    p = np.asarray(pixel_xy, np.float64)
    um, px = 0.0, 0.0
    for axis in (0, 1):
        if len(np.unique(a[:, axis])) > 1:
            um += spec.step_um[axis]
            px += abs(np.polyfit(a[:, axis], p[:, axis], 1)[0])
    if um == 0 or not px > 0:
        return None
    return float(um / px)


def st_grid_mpp(obs, array: str | None = None) -> float | None:
    """µm/px from the spot grid of ``obs`` (``x``, ``y``, ``pixel_x``, ``pixel_y``): the
    ST array (1k or 2k, detected from the coordinates when not given) knows the pitch."""
    array = array or detect_st_array(obs["x"].to_numpy(), obs["y"].to_numpy())
    return estimate_mpp(obs[["x", "y"]].to_numpy(), obs[["pixel_x", "pixel_y"]].to_numpy(), array)
