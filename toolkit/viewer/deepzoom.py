"""The slide as a Deep Zoom pyramid (openslide-python's ``DeepZoomGenerator``).

Slides OpenSlide reads are tiled from their own pyramid; plain images (JPEG, PNG, flat
TIFF, read by mclx through PIL) go through OpenSlide's ``ImageSlide``, which gives PIL
images the same interface. The pyramid's full-resolution level is the slide's level 0,
so OpenSeadragon's image coordinates are the level-0 pixels of ``obsm["spatial"]``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TILE_SIZE = 254  # + 1 px overlap on each side: 256 px tiles, as openslide's examples
OVERLAP = 1
FORMAT = "jpeg"
QUALITY = 85
FOLDER = "slide_files"  # Deep Zoom's name for the tiles of slide.dzi


def _source(slide):
    """What ``DeepZoomGenerator`` reads: the OpenSlide handle, or the decoded plain image
    (the pixels mclx predicted on, orientation applied) as an ``ImageSlide``."""
    if getattr(slide, "osr", None) is not None:
        return slide.osr
    from openslide import ImageSlide
    from PIL import Image

    return ImageSlide(Image.fromarray(slide.pixels))


def write_pyramid(slide, folder: Path, *, workers: int = 2, progress: bool = True) -> dict:
    """Write ``folder/slide.dzi`` and ``folder/slide_files/LEVEL/COL_ROW.jpeg``; return the
    Deep Zoom descriptor as OpenSeadragon takes it inline (a page opened from disk may
    not fetch the ``.dzi``)."""
    from openslide import OpenSlideError
    from openslide.deepzoom import DeepZoomGenerator
    from tqdm.auto import tqdm

    from mclx.errors import DataError

    dz = DeepZoomGenerator(_source(slide), tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)
    width, height = dz.level_dimensions[-1]
    jobs = [
        (level, col, row)
        for level, (cols, rows) in enumerate(dz.level_tiles)
        for col in range(cols)
        for row in range(rows)
    ]
    for level in range(dz.level_count):
        (folder / FOLDER / str(level)).mkdir(parents=True, exist_ok=True)

    def save(job: tuple[int, int, int]) -> None:
        level, col, row = job
        try:
            tile = dz.get_tile(level, (col, row)).convert("RGB")
        except OpenSlideError as exc:
            msg = f"{slide.path}: cannot read its pixels (truncated or corrupt?) ({exc})"
            raise DataError(msg) from exc
        tile.save(folder / FOLDER / str(level) / f"{col}_{row}.{FORMAT}", quality=QUALITY)

    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(jobs), desc="pyramid", unit="tile", disable=not progress) as bar,
    ):
        for _ in pool.map(save, jobs):
            bar.update()
    (folder / "slide.dzi").write_text(dz.get_dzi(FORMAT))
    return {
        "Image": {
            "xmlns": "http://schemas.microsoft.com/deepzoom/2008",
            "Url": f"{FOLDER}/",
            "Format": FORMAT,
            "Overlap": str(OVERLAP),
            "TileSize": str(TILE_SIZE),
            "Size": {"Width": str(width), "Height": str(height)},
        }
    }
