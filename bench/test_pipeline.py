"""End-to-end `infer` throughput vs encoder-only throughput, same backend and batch.

A pyramidal TIFF written from the C2 HER2+ image is tiled over its tissue and streamed
through ONNX Runtime (CPU): reader threads, encoder, retrieval against a bank. The
encoder-only run encodes the very same tiles, already in memory. The ratio of the two
tiles/s says how well reading and retrieval hide behind the encoder.

    pytest bench/test_pipeline.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import numpy as np
import pytest

BATCH = 32


@pytest.fixture(scope="module")
def slide_and_tiles(her2st_model, tmp_path_factory):
    """C2 as a pyramidal TIFF, its tissue tiles, the ONNX Runtime FP32 encoder and the
    bank (the checkpoint of conftest's ``her2st_model``)."""
    from mclx.data.resolution import tile_size
    from mclx.data.slide import load_image, open_slide, write_pyramidal_tiff
    from mclx.inference import open_encoder
    from mclx.wsi.plan import view_sizes
    from mclx.wsi.tiling import grid_tiles

    ck, bank, c2, _ = her2st_model
    path = tmp_path_factory.mktemp("slide") / "C2.tif"
    write_pyramidal_tiff(load_image(c2.uns["image_path"]), path, mpp=float(c2.uns["mpp"]))
    slide = open_slide(path)
    enc = open_encoder(ck, backend="onnxruntime", precision="fp32", device="cpu")
    tiles = grid_tiles(slide, size=tile_size(enc.pre, slide.mpp, str(path)))
    tiles.views = view_sizes(enc.pre, slide.mpp, str(path))  # a --context-fov model's
    return slide, tiles, enc, bank


def test_end_to_end_stream(benchmark, slide_and_tiles):
    from mclx.bank import load_bank
    from mclx.wsi.runtime import stream

    slide, tiles, enc, bank_path = slide_and_tiles
    bank = load_bank(bank_path)
    benchmark.group = "pipeline tiles/s (onnxruntime fp32, batch 32)"

    def run():
        return stream(
            slide,
            tiles,
            enc,
            bank,
            k=200,
            distance="l2",
            batch_size=BATCH,
            progress=False,
        )

    preds, timings = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    assert preds.shape[0] == len(tiles)
    benchmark.extra_info["tiles"] = len(tiles)
    benchmark.extra_info["tiles_per_s"] = len(tiles) / benchmark.stats.stats.min
    benchmark.extra_info.update({f"seconds_{k}": v for k, v in timings.items()})


def test_encoder_only(benchmark, slide_and_tiles):
    slide, tiles, enc, _ = slide_and_tiles
    from mclx.wsi.prefetch import read_tile

    size = enc.pre.patch_size
    imgs = np.stack([read_tile(slide, tiles.crops(i), size) for i in range(len(tiles))])
    benchmark.group = "pipeline tiles/s (onnxruntime fp32, batch 32)"

    def run():
        for s in range(0, len(imgs), BATCH):
            enc(imgs[s : s + BATCH])

    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    benchmark.extra_info["tiles"] = len(tiles)
    benchmark.extra_info["tiles_per_s"] = len(tiles) / benchmark.stats.stats.min
