"""Slides in the wild: readers chosen by content, resolutions a microscope can have, work
planned (and refused) before tiles are read, pen ink kept out of the tissue grid.

Real files: OpenSlide's own test slides in ``../shared/data/slide-fixtures`` (DICOM,
Aperio) and a her2st H&E image; made here: images with ordinary screen/print densities
and pyramidal TIFFs. The command-line refusals are in the bad-input catalogue
(test_bad_inputs.py); resuming a killed run in test_interrupt.py.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import needs
from helpers.data import ROOT

from mclx.config import PreprocessCfg
from mclx.errors import DataError

FIXTURES = Path(ROOT.parent / "shared" / "data" / "slide-fixtures")
DICOM = ("boxes_0.dcm", "boxes_1.dcm")


@pytest.fixture(scope="module")
def fixtures() -> Path:
    if not (FIXTURES / "boxes.svs").is_file():
        pytest.skip(f"needs OpenSlide's test slides: not found at {FIXTURES}")
    return FIXTURES


def save(path: Path, pixels: np.ndarray, **kw) -> Path:
    from PIL import Image

    Image.fromarray(pixels).save(path, **kw)
    return path


def tissue_like(h=300, w=250, seed=0) -> np.ndarray:
    """Pink-purple blobs on near-white glass."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 240, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for cy, cx, r in rng.uniform([0, 0, 20], [h, w, 60], (6, 3)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (190, 110, 170)
    return img


# --------------------------------------------------------------------------- by content


@pytest.mark.parametrize(
    "name", ["boxes_0.dcm", "boxes_1.dcm", "."], ids=["file0", "file1", "folder"]
)
def test_dicom_opens_through_any_instance_or_its_folder(fixtures, tmp_path, name):
    from mclx.data.slide import open_slide

    for f in DICOM:  # under names without a suffix: the content decides, not the name
        shutil.copyfile(fixtures / f, tmp_path / f.replace(".dcm", ""))
    slide = open_slide(tmp_path / name.replace(".dcm", ""))
    assert (slide.backend, slide.vendor) == ("openslide", "dicom")
    assert slide.dimensions == (16, 16)
    assert slide.resolution.mpp == pytest.approx(0.499) and "dicom" in slide.resolution.source
    want = open_slide(fixtures / "boxes.svs").read(0, 0, 16)  # the same boxes, as Aperio
    assert np.abs(slide.read(0, 0, 16).astype(int) - want).mean() < 8


def test_reader_is_chosen_by_content_not_suffix(fixtures, tmp_path):
    from mclx.data.slide import open_slide

    svs_as_tif = shutil.copyfile(fixtures / "boxes.svs", tmp_path / "boxes.tif")
    assert open_slide(svs_as_tif).vendor == "aperio"
    png_as_svs = save(tmp_path / "image.svs", tissue_like(), format="PNG")
    slide = open_slide(png_as_svs)
    assert (slide.backend, slide.vendor) == ("pil", "png")


def test_a_folder_without_dicom_is_refused_naming_it(tmp_path):
    from mclx.data.slide import open_slide

    save(tmp_path / "a.png", tissue_like())
    with pytest.raises(DataError, match=r"none of its 1 files is DICOM"):
        open_slide(tmp_path)


def test_plain_images_are_decoded_at_the_first_read_only(tmp_path):
    from mclx.data.slide import open_slide

    slide = open_slide(save(tmp_path / "t.png", tissue_like()))
    assert slide._pixels is None and slide.dimensions == (250, 300)
    assert slide.decoded_bytes() == 250 * 300 * 3
    assert slide.read(0, 0, 10).shape == (10, 10, 3) and slide._pixels is not None


# --------------------------------------------------------------------------- resolutions


@pytest.mark.parametrize("dpi", [72, 96, 150, 300, 2400])
@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "JPEG"])
def test_screen_and_print_densities_are_not_a_resolution(tmp_path, fmt, dpi):
    from mclx.data.slide import open_slide

    path = save(tmp_path / f"x.{fmt.lower()}", tissue_like(), format=fmt, dpi=(dpi, dpi))
    res = open_slide(path).resolution
    assert res.mpp is None and res.source == "none"
    assert f" {dpi} dpi" in res.found
    said = float(re.search(r"= ([\d.]+) µm/px", res.found).group(1))
    assert said == pytest.approx(25400 / dpi, rel=2e-3)


def test_a_microscope_density_is_believed_and_an_absurd_one_is_not(tmp_path):
    from mclx.data.slide import open_slide

    px_per_cm = 1e4 / 0.5  # 0.5 µm/px
    tif = save(tmp_path / "ok.tif", tissue_like(), resolution=px_per_cm, resolution_unit=3)
    # PIL writes the tags as given; read back independently with tifffile
    import tifffile

    with tifffile.TiffFile(tif) as tf:
        x = tf.pages[0].tags["XResolution"].value
    assert open_slide(tif).resolution.mpp == pytest.approx(1e4 * x[1] / x[0], rel=1e-6)
    assert open_slide(tif).resolution.source == "resolution tag"
    far = save(tmp_path / "far.tif", tissue_like(), resolution=1.0, resolution_unit=3)
    res = open_slide(far).resolution
    assert res.mpp is None and "10000 µm/px, outside 0.05-20 µm/px" in res.found
    assert open_slide(far, mpp=0.8).resolution.mpp == 0.8  # --mpp is the user's word


def test_pyramidal_tiff_resolution_comes_through_openslide(tmp_path):
    from mclx.data.slide import open_slide, write_pyramidal_tiff

    img = np.tile(tissue_like(256, 256), (4, 4, 1))
    tif = write_pyramidal_tiff(img, tmp_path / "p.tif", mpp=0.25, tile=256)
    slide = open_slide(tif)
    assert (slide.vendor, slide.resolution.mpp) == ("generic-tiff", pytest.approx(0.25))
    assert slide.resolution.source == "resolution tag"
    at72 = write_pyramidal_tiff(img, tmp_path / "s.tif", mpp=25400 / 72, tile=256)
    assert open_slide(at72).resolution.mpp is None
    assert "72 dpi" in open_slide(at72).resolution.found


# --------------------------------------------------------------------------- the plan


class Where:
    """Tiles at given centres (what the runtime's spots give), and a slide µm/px."""

    def __init__(self, mpp, n=4):
        self.mpp, self.found, self.n = mpp, "", n

    def tiles(self, slide, *, size, stride, max_tiles):
        from mclx.wsi.tiling import Tiles

        xy = np.full((self.n, 2), 500.0)
        return Tiles(xy, [f"t{i}" for i in range(self.n)], size)


def test_plan_reads_from_the_level_nearest_above_the_model_resolution(tmp_path, monkeypatch):
    from mclx.data.slide import open_slide, write_pyramidal_tiff
    from mclx.wsi.plan import make_plan

    img = np.tile(tissue_like(256, 256), (4, 4, 1))  # 1024 px: levels 1, 2, 4 (256 px tiles)
    slide = open_slide(write_pyramidal_tiff(img, tmp_path / "p.tif", mpp=0.25, tile=256))
    assert slide.level_downsamples == pytest.approx((1, 2, 4))
    pre = PreprocessCfg(patch_size=32, mpp=0.9)  # 3.6 level-0 px per model px
    work = make_plan(slide, Where(0.25), pre, n_genes=10)
    assert work.tiles.size == 115 and work.resample == pytest.approx(115 / 32)
    assert (work.level, work.level_downsample) == (1, 2.0)  # level 2 (4x) would be coarser
    reads = []
    original = slide.osr.read_region
    monkeypatch.setattr(slide.osr, "read_region", lambda *a: reads.append(a[1]) or original(*a))
    slide.read(0, 0, work.tiles.size, 32)
    assert reads == [1]


@pytest.mark.parametrize(
    "slide_mpp, match",
    [(352.78, r"resampled 392x up .*limit 16x"), (0.02, r"resampled 45x down .*limit 32x")],
)
def test_plan_refuses_absurd_resampling(tmp_path, slide_mpp, match):
    from mclx.data.slide import open_slide
    from mclx.wsi.plan import make_plan

    slide = open_slide(save(tmp_path / "t.png", tissue_like()))
    with pytest.raises(DataError, match=match):
        make_plan(slide, Where(slide_mpp), PreprocessCfg(patch_size=224, mpp=0.9), n_genes=10)


def test_plan_names_the_resolution_it_set_aside(tmp_path):
    from mclx.wsi.plan import make_plan

    where = Where(None)
    where.found = "resolution tag 72 dpi = 352.8 µm/px, a screen/print density"
    with pytest.raises(DataError, match=r"µm/px unknown \(resolution tag 72 dpi .*pass --mpp"):
        make_plan(None, where, PreprocessCfg(patch_size=224, mpp=0.9), n_genes=10, source="s.tif")


def test_plan_refuses_more_memory_than_available(tmp_path, monkeypatch):
    import mclx.wsi.plan
    from mclx.data.slide import open_slide

    slide = open_slide(save(tmp_path / "t.png", tissue_like()))
    monkeypatch.setattr(mclx.wsi.plan, "available_memory", lambda: 100_000)  # < the image
    with pytest.raises(MemoryError, match=r"t.png: the run needs about .* GiB \(the decoded"):
        mclx.wsi.plan.make_plan(
            slide, Where(0.9), PreprocessCfg(patch_size=32, mpp=0.9), n_genes=10
        )
    monkeypatch.setattr(mclx.wsi.plan, "available_memory", lambda: 1 << 40)
    pre = PreprocessCfg(patch_size=32, mpp=0.9)
    work = mclx.wsi.plan.make_plan(slide, Where(0.9, n=1000), pre, n_genes=10)
    # the predictions' share, from the formula's terms: 2 copies of N x G float32
    assert work.memory >= slide.decoded_bytes() + 2 * 1000 * 10 * 4


def test_grid_is_refused_beyond_max_tiles_with_what_was_counted(tmp_path):
    from mclx.data.slide import open_slide
    from mclx.wsi.tiling import grid_tiles

    slide = open_slide(save(tmp_path / "t.png", tissue_like(600, 500)))
    every = grid_tiles(slide, size=20)
    assert len(every) > 10
    assert len(grid_tiles(slide, size=20, max_tiles=len(every))) == len(every)
    with pytest.raises(DataError, match=r"more than --max-tiles 10 tiles .*20 px every 20 px"):
        grid_tiles(slide, size=20, max_tiles=10)


def test_grid_in_row_blocks_equals_the_whole_grid(tmp_path, monkeypatch):
    """Blocks of rows (bounded memory) keep the tiles one pass over the grid keeps."""
    from mclx.data.slide import open_slide
    from mclx.wsi.tiling import grid_tiles, slide_tissue

    slide = open_slide(save(tmp_path / "t.png", tissue_like(600, 500)))
    tissue = slide_tissue(slide)
    whole = grid_tiles(slide, size=16, stride=8, tissue=tissue)
    monkeypatch.setattr("mclx.wsi.tiling.GRID_BLOCK", 1)  # one row of the grid at a time
    blocks = grid_tiles(slide, size=16, stride=8, tissue=tissue)
    assert blocks.ids == whole.ids and np.array_equal(blocks.centres, whole.centres)
    # and against a brute-force count on the mask itself
    mask, f = tissue
    xs, ys = (np.asarray([int(i.split("_")[k]) for i in whole.ids]) for k in (1, 2))
    for x, y in list(zip(xs, ys))[:50]:
        rows = slice(int(y // f), int(np.ceil((y + 16) / f)))
        assert mask[rows, int(x // f) : int(np.ceil((x + 16) / f))].mean() >= 0.5


# --------------------------------------------------------------------------- ink


def stroke(img: np.ndarray, colour, y: int, width: int) -> np.ndarray:
    """A pen stroke across the whole image, ``width`` px wide, centred on row ``y``,
    slightly wavy (a hand, not a ruler)."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    w = img.shape[1]
    pts = [(x, y + 0.03 * w * np.sin(x / w * 6)) for x in np.linspace(0, w, 40)]
    draw.line(pts, fill=colour, width=width, joint="curve")
    return np.asarray(im)


@pytest.fixture(scope="module")
def c2_quarter(her2st) -> np.ndarray:
    """her2st's C2 H&E image at 1/4 scale (~2300 x 2500 px), decoded once."""
    from mclx.data.her2st import find_data_root
    from mclx.data.slide import open_slide

    image = next((find_data_root(her2st) / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    return open_slide(image).thumbnail(2400)[0]


@needs("her2st")
@pytest.mark.parametrize("colour", [(35, 55, 165), (40, 140, 75), (25, 25, 30)],
                         ids=["blue", "green", "black"])  # fmt: skip
def test_pen_strokes_add_no_tile(c2_quarter, tmp_path, colour):
    """A stroke over glass and tissue of a real H&E image: no tile that the clean image
    does not keep (before ink was set aside, every tile under the stroke on glass was
    kept), and the tissue away from the stroke keeps its tiles."""
    from mclx.data.slide import open_slide
    from mclx.wsi.tiling import grid_tiles

    clean = c2_quarter
    size, h = 56, clean.shape[0]
    inked = clean
    for y in (0.2 * h, 0.5 * h, 0.8 * h):  # three strokes, two tiles wide
        inked = stroke(inked, colour, int(y), 2 * size)
    kept = {}
    for name, img in (("clean", clean), ("inked", inked)):
        slide = open_slide(save(tmp_path / f"{name}.png", img))
        kept[name] = set(grid_tiles(slide, size=size).ids)
    inked_frac = _inked_fraction(clean, inked, size)
    under = {t for t, frac in inked_frac.items() if frac > 0.9}
    assert under, "the strokes cover no whole tile"
    assert not (kept["inked"] - kept["clean"])
    assert not (kept["inked"] & under)
    away = {t for t in kept["clean"] if inked_frac[t] == 0}
    assert len(away & kept["inked"]) >= 0.95 * len(away)


def _inked_fraction(clean, inked, size) -> dict[str, float]:
    """Fraction of each grid tile's pixels that the strokes changed, by tile id."""
    changed = np.any(clean != inked, -1)
    h, w = (n // size * size for n in changed.shape)
    frac = changed[:h, :w].reshape(h // size, size, w // size, size).mean((1, 3))
    return {f"tile_{x * size}_{y * size}": frac[y, x] for y, x in np.ndindex(frac.shape)}


def test_ink_mask_finds_pen_colours_and_spares_h_and_e():
    from mclx.wsi.tiling import ink_mask

    colours = {
        "blue ink": (35, 55, 165), "green ink": (40, 140, 75), "black ink": (25, 25, 30),
        "eosin": (230, 150, 190), "haematoxylin": (120, 90, 170), "dense nuclei": (80, 50, 130),
        "glass": (242, 242, 242),
    }  # fmt: skip
    img = np.concatenate([np.full((8, 8, 3), c, np.uint8) for c in colours.values()], 1)
    ink = ink_mask(img)[4, 4::8]  # the centre row, one pixel per colour block
    assert dict(zip(colours, ink.tolist())) == {
        "blue ink": True, "green ink": True, "black ink": True, "eosin": False,
        "haematoxylin": False, "dense nuclei": False, "glass": False,
    }  # fmt: skip
