"""Image loading and patch extraction around spot centres.

Patches are ``patch_size`` square, centred on the spot, zero-padded where they cross the
image border (as PIL's ``crop`` does in the reference code). They stay uint8 NHWC until
the model's input transform scales them (``[0, 1]``, no mean/std by default).
"""

from __future__ import annotations

import numpy as np

from mclx.errors import DataError


def extract_patches(image: np.ndarray, centers: np.ndarray, size: int = 224) -> np.ndarray:
    """Square uint8 patches (N, size, size, 3) centred on ``centers`` (N, 2) as (x, y).

    A patch spans ``[c - size//2, c - size//2 + size)`` on each axis with the centre
    rounded down to a pixel (PIL ``crop`` semantics); pixels outside the image are zero.
    """
    centers = np.asarray(centers, dtype=np.float64)
    h, w = image.shape[:2]
    out = np.zeros((len(centers), size, size, image.shape[2]), dtype=image.dtype)
    half = size // 2
    for i, (cx, cy) in enumerate(np.floor(centers).astype(np.int64)):
        x0, y0 = cx - half, cy - half
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + size, w), min(y0 + size, h)
        if sx1 <= sx0 or sy1 <= sy0:
            continue
        out[i, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def source_size(
    size: int, mpp: float | None, section_mpp: float | None, where: str = "", fov_um: float = 0.0
) -> int:
    """Pixels of the section's image that cover a ``size``-pixel patch at ``mpp`` (the
    model's µm/px): the rule of whole-slide inference (:func:`mclx.data.resolution.tile_size`),
    so that training, evaluation and inference cut the same tissue. With ``fov_um`` (a
    wider field of view, ``--context-fov``), the pixels that cover ``fov_um`` µm instead,
    refused when the image's µm/px is unknown."""
    from types import SimpleNamespace

    from mclx.data.resolution import tile_size

    if fov_um:
        if not section_mpp:
            msg = f"{where}: µm/px unknown, so a field of view of {fov_um:g} µm has no scale"
            raise DataError(msg)
        return max(1, round(float(fov_um) / float(section_mpp)))
    return tile_size(SimpleNamespace(mpp=mpp, patch_size=size), section_mpp, where)


def section_patches(
    adata, size: int = 224, mpp: float | None = None, fov_um: float = 0.0
) -> np.ndarray:
    """Patches of every spot of a section that has an image, resampled to ``mpp`` µm/px
    (None: as the image is), read through the slide readers as whole-slide inference
    reads tiles (whole-slide formats region by region, plain images decoded once).
    With ``fov_um``, each patch instead covers ``fov_um`` µm around the spot, resized
    to ``size`` pixels (zero beyond the image's border, as every patch)."""
    from mclx.data.slide import open_slide

    path = adata.uns.get("image_path")
    if not path:
        msg = f"section {adata.uns.get('section')}: has no image, cannot cut patches"
        raise DataError(msg)
    where = f"{path} (section {adata.uns.get('section')})"
    src = source_size(size, mpp, adata.uns.get("mpp"), where, fov_um)
    corners = np.floor(np.asarray(adata.obsm["spatial"], np.float64)).astype(np.int64) - src // 2
    slide = open_slide(path)
    try:
        return np.stack([slide.read(int(x), int(y), src, size) for x, y in corners])
    finally:
        slide.close()


def model_patches(adata, pre) -> np.ndarray:
    """A section's patches as a model with preprocessing ``pre`` reads them: the patch
    at ``pre.mpp``, then each wider field of view of ``pre.views_um`` (``--context-fov``)
    on the channel axis, (N, S, S, 3 (1 + V)) uint8 (what whole-slide inference cuts)."""
    views = [section_patches(adata, pre.patch_size, pre.mpp)]
    views += [section_patches(adata, pre.patch_size, pre.mpp, w) for w in pre.views_um]
    return np.concatenate(views, axis=-1) if len(views) > 1 else views[0]
