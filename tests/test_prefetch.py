"""Tile readers: a pool of processes gives the batches a pool of threads gives."""

from __future__ import annotations

import numpy as np
import pytest

from mclx.data.slide import open_slide, write_pyramidal_tiff
from mclx.wsi.prefetch import pool_for, prefetch
from mclx.wsi.tiling import Tiles


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    return write_pyramidal_tiff(image, tmp_path_factory.mktemp("slide") / "s.tif", mpp=0.5)


def tiles(n: int, size: int) -> Tiles:
    rng = np.random.default_rng(1)
    centres = rng.uniform(-50, 950, (n, 2))  # some tiles partly outside the slide
    return Tiles(centres=centres, ids=[str(i) for i in range(n)], size=size)


@pytest.mark.parametrize("size", [64, 150])  # level 0 upsampled; level 1 downsampled
def test_processes_read_what_threads_read(pyramid, size):
    slide = open_slide(pyramid)
    t = tiles(23, size)
    want = [b for b, *_ in prefetch(slide, t, out=96, batch_size=5, workers=2, start=3)]
    got = prefetch(slide, t, out=96, batch_size=5, workers=2, start=3, pool="processes")
    got = [b for b, *_ in got]
    assert [len(b) for b in got] == [5, 5, 5, 5]  # tiles 3..22 in order
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
    first = slide.read(*t.origin(3), size, 96)
    np.testing.assert_array_equal(got[0][0], first)


def test_a_read_error_in_a_process_reader_is_the_one_line_error(pyramid, tmp_path):
    from mclx.errors import DataError

    broken = tmp_path / "broken.tif"
    data = pyramid.read_bytes()
    broken.write_bytes(data)
    slide = open_slide(broken)
    broken.write_bytes(data[: len(data) // 2])  # truncated after the header was read
    with pytest.raises(DataError, match=r"broken\.tif: (cannot read region|truncated)"):
        for _ in prefetch(slide, tiles(40, 150), out=96, batch_size=8, workers=2,
                          pool="processes"):  # fmt: skip
            pass
    broken.unlink()  # gone before the readers open it
    with pytest.raises(OSError, match=r"broken\.tif"):
        next(prefetch(slide, tiles(4, 150), out=96, batch_size=2, workers=1, pool="processes"))


def test_plain_images_are_read_by_threads(tmp_path):
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    assert pool_for(open_slide(path), "processes") == "threads"  # decoded once, not per process
    with pytest.raises(ValueError, match="unknown reader pool 'fibres'"):
        pool_for(open_slide(path), "fibres")
