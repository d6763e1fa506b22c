"""Tissue fraction of a crop -> tiles kept, against an independent reference mask.

Run as ``MCLX_HER2ST=../shared/data/her2st python bench/tissue_mask_table.py`` (not a
pytest file). For each of the five her2st H&E images (full resolution), crops of
2240 x 2240 px (10 x 10 tiles of 224 px) whose reference tissue share is nearest 10, 50,
90 and 100 %; the reference is scikit-image's three-class ``threshold_multiotsu`` on the
whole section's grey level (brightest class = glass), closed and hole-filled, on a 1/8
thumbnail. Prints section, target, reference share, reference tiles (>= 50 % tissue),
tiles ``grid_tiles`` keeps with mclx's mask, and the crop's top-left corner.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

SIZE, CROP, F0 = 224, 2240, 8.0


def reference(thumb: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_closing, binary_fill_holes
    from skimage.filters import threshold_multiotsu

    grey = thumb[..., :3].mean(-1)
    glass = threshold_multiotsu(grey, classes=3)[-1]
    return binary_fill_holes(binary_closing(grey < glass, np.ones((5, 5), bool)))


def reference_tiles(ref: np.ndarray, f: float) -> int:
    n = 0
    for y in range(0, CROP - SIZE + 1, SIZE):
        for x in range(0, CROP - SIZE + 1, SIZE):
            rows = slice(int(y / f), int(np.ceil((y + SIZE) / f)))
            n += ref[rows, int(x / f) : int(np.ceil((x + SIZE) / f))].mean() >= 0.5
    return n


def main() -> None:
    from PIL import Image

    from mclx.data.slide import open_slide
    from mclx.errors import DataError
    from mclx.wsi.tiling import grid_tiles

    Image.MAX_IMAGE_PIXELS = None
    root = Path(os.environ.get("MCLX_HER2ST", "../shared/data/her2st")) / "data" / "ST-imgs"
    tmp = Path(tempfile.mkdtemp())
    for path in sorted(root.glob("C/*/*.jpg")):
        full = np.asarray(Image.open(path).convert("RGB"))
        H, W = full.shape[:2]
        small = Image.fromarray(full).resize((int(W / F0), int(H / F0)), Image.BILINEAR)
        ref = reference(np.asarray(small))
        c = int(CROP / F0)
        shares = {
            (x, y): ref[y : y + c, x : x + c].mean()
            for y in range(0, ref.shape[0] - c, c // 4)
            for x in range(0, ref.shape[1] - c, c // 4)
        }
        for target in (0.1, 0.5, 0.9, 1.0):
            (x, y), share = min(shares.items(), key=lambda kv: abs(kv[1] - target))
            X, Y = int(x * F0), int(y * F0)
            crop = tmp / f"{path.parent.name}_{int(target * 100)}.png"
            Image.fromarray(full[Y : Y + CROP, X : X + CROP]).save(crop)
            slide = open_slide(crop)
            f = slide.thumbnail(2048)[1]
            try:
                kept: int | str = len(grid_tiles(slide, size=SIZE))
            except DataError as exc:
                kept = f"error ({exc})"
            rc = np.asarray(Image.fromarray(ref[y : y + c, x : x + c]).resize(
                (round(CROP / f), round(CROP / f)), Image.NEAREST))  # fmt: skip
            print(path.parent.name, target, round(float(share), 2),
                  reference_tiles(rc, f), kept, (X, Y), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
