"""Reader-only throughput: can the tile readers feed a GPU?

C2's HER2+ image as a JPEG-compressed pyramidal TIFF (as scanners write them), 224 px
tiles (the slide's own µm/px, the model's) every 112 px over the whole image (~7,200
tiles, so that a round lasts seconds, as a slide of 10^4-10^5 tiles does), decoded into
uint8 batches of 32 by :func:`mclx.wsi.prefetch.prefetch` with 1 and 2 threads and 1 and 2
processes; no encoder. tiles/s is in each row's extra info; the group compares them side
by side. Processes pay their start-up (spawn, import, open the slide) in every round, as
a run would; ``test_process_start_up`` measures that start-up alone (one batch).

    pytest bench/test_readers.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
from conftest import HER2ST

BATCH = 32


@pytest.fixture(scope="module")
def jpeg_slide(tmp_path_factory):
    from mclx.data.her2st import read_section
    from mclx.data.slide import load_image, open_slide, write_pyramidal_tiff
    from mclx.wsi.tiling import grid_tiles

    pytest.importorskip("imagecodecs", reason="JPEG TIFFs need imagecodecs (the bench extra)")
    if not (HER2ST / "data" / "ST-cnts").is_dir():
        pytest.skip(f"needs the her2st data: not found at {HER2ST} (set MCLX_HER2ST)")
    c2 = read_section(HER2ST, "C2")
    path = tmp_path_factory.mktemp("slide") / "C2.jpeg.tif"
    write_pyramidal_tiff(
        load_image(c2.uns["image_path"]), path, mpp=float(c2.uns["mpp"]), compression="jpeg"
    )
    slide = open_slide(path)
    return slide, grid_tiles(slide, size=224, stride=112, min_tissue=0.0)


@pytest.mark.parametrize("pool", ["threads", "processes"])
@pytest.mark.parametrize("workers", [1, 2])
def test_reader_throughput(benchmark, jpeg_slide, pool, workers):
    from mclx.wsi.prefetch import prefetch

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


def test_process_start_up(benchmark, jpeg_slide):
    """One batch through a fresh pool of 1 process: what each run pays before reading."""
    from mclx.wsi.prefetch import prefetch
    from mclx.wsi.tiling import Tiles

    slide, tiles = jpeg_slide
    benchmark.group = "readers: process pool start-up (1 batch of 32)"
    first = Tiles(tiles.centres[:BATCH], tiles.ids[:BATCH], tiles.size)

    def run():
        return sum(len(b) for b, *_ in prefetch(
            slide, first, out=224, batch_size=BATCH, workers=1, pool="processes"
        ))  # fmt: skip

    assert benchmark.pedantic(run, rounds=3, iterations=1) == BATCH
