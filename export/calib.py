"""Real patches for parity checks and INT8 calibration.

``source`` may be a her2st-layout folder (patches at the spots of its image sections), a
folder of image files (central patch of each), or None (uniform random pixels, which
says little about accuracy on tissue: pass real data when you can).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mclx.data.her2st import IMAGE_SUFFIXES


def calibration_patches(
    source: str | os.PathLike | None, *, n: int = 64, size: int = 224, seed: int = 0
) -> tuple[np.ndarray, str]:
    """``n`` uint8 NHWC patches and a short description of where they came from."""
    rng = np.random.default_rng(seed)
    if source is None:
        return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8), "random pixels"
    path = Path(source)
    if not path.exists():
        msg = f"{path}: calibration data does not exist"
        raise FileNotFoundError(msg)
    if (path / "ST-cnts").is_dir() or (path / "data" / "ST-cnts").is_dir():
        from mclx.data.her2st import list_sections, read_section
        from mclx.data.patches import section_patches

        sections = list_sections(path, with_image=True)
        if not sections:
            msg = f"{path}: no section with an image for calibration"
            raise FileNotFoundError(msg)
        per = max(1, -(-n // len(sections)))
        parts = []
        for s in sections:
            p = section_patches(read_section(path, s), size)
            parts.append(p[rng.choice(len(p), size=min(per, len(p)), replace=False)])
        return np.concatenate(parts)[:n], f"{len(sections)} her2st sections under {path}"
    from mclx.data.patches import extract_patches
    from mclx.data.slide import load_image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        msg = f"{path}: no image files for calibration"
        raise FileNotFoundError(msg)
    patches = []
    for f in files:
        img = load_image(f)
        h, w = img.shape[:2]
        centres = rng.uniform([0, 0], [w, h], size=(max(1, n // len(files)), 2))
        patches.append(extract_patches(img, centres, size))
    return np.concatenate(patches)[:n], f"{len(files)} images under {path}"
