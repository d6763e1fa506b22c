"""Reader-only throughput: can the tile readers feed a GPU?

C2's HER2+ image as a JPEG-compressed pyramidal TIFF (as scanners write them), its
tissue tiles at 224 px (the slide's own µm/px, the model's), decoded into uint8 batches
of 32 by :func:`mclx.prefetch.prefetch` with 1 and 2 threads and 1 and 2 processes; no
encoder. tiles/s is in each row's extra info; the group compares them side by side.
Processes pay their start-up (opening the slide) in every round, as a run would.

    pytest bench/test_readers.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
from conftest import HER2ST

BATCH = 32


@pytest.fixture(scope="module")
def jpeg_slide(tmp_path_factory):
    from mclx.data.her2st import read_section
    from mclx.data.patches import load_image
    from mclx.slide import open_slide, write_pyramidal_tiff
    from mclx.tiling import grid_tiles

    pytest.importorskip("imagecodecs", reason="JPEG TIFFs need imagecodecs (the bench extra)")
    if not (HER2ST / "data" / "ST-cnts").is_dir():
        pytest.skip(f"needs the her2st data: not found at {HER2ST} (set MCLX_HER2ST)")
    c2 = read_section(HER2ST, "C2")
    path = tmp_path_factory.mktemp("slide") / "C2.jpeg.tif"
    write_pyramidal_tiff(
        load_image(c2.uns["image_path"]), path, mpp=float(c2.uns["mpp"]), compression="jpeg"
    )
    slide = open_slide(path)
    return slide, grid_tiles(slide, size=224, min_tissue=0.0)


@pytest.mark.parametrize("pool", ["threads", "processes"])
@pytest.mark.parametrize("workers", [1, 2])
def test_reader_throughput(benchmark, jpeg_slide, pool, workers):
    from mclx.prefetch import prefetch

    slide, tiles = jpeg_slide
    benchmark.group = f"readers tiles/s (JPEG TIFF, {len(tiles)} tiles of 224 px)"

    def run():
        return sum(
            len(b) for b, *_ in prefetch(
                slide, tiles, out=224, batch_size=BATCH, workers=workers, pool=pool
            )
        )  # fmt: skip

    n = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    assert n == len(tiles)
    benchmark.extra_info["tiles_per_s"] = len(tiles) / benchmark.stats.stats.min
