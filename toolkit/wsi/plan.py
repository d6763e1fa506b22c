"""What a slide run will do, known before a tile is read, and the runs that are refused.

:func:`make_plan` turns the slide's resolution and the checkpoint's µm/px into the tile side
in level-0 pixels and a resampling factor (refused beyond :data:`MAX_DOWNSAMPLE` /
:data:`MAX_UPSAMPLE`: a wrong µm/px, not a slide), picks the pyramid level tiles are read
from, places the tiles (a tissue grid refused beyond ``max_tiles``, or given spots) and
estimates the memory the run needs (refused beyond what the machine has available).
:func:`locate` opens the slide and finds where its tiles go and its µm/px
(:class:`Where`); :func:`slide_record` is that part of ``uns["mclx"]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mclx.data.resolution import check_resampling, tile_size
from mclx.errors import DataError

MAX_TILES = 2_000_000  # default --max-tiles: a 4 cm² section at 224 px, 0.5 µm/px, 4x overlap
GiB = 1 << 30


@dataclass
class Plan:
    """The run, before its tiles are read. ``memory`` is the estimated peak (bytes) of
    what grows with the slide: decoded image, patches in flight, predictions."""

    tiles: Any
    patch_size: int
    resample: float
    level: int
    level_downsample: float
    memory: int

    def record(self) -> dict[str, Any]:
        views = [int(v) for v in self.tiles.views]  # wider fields of view (--context-fov)
        return {
            "tiles": len(self.tiles),
            "tile_size_level0": int(self.tiles.size),
            **({"view_sizes_level0": views} if views else {}),
            "resample": float(self.resample),
            "read_level": int(self.level),
            "read_level_downsample": float(self.level_downsample),
            "memory_estimate_bytes": int(self.memory),
        } | ({} if self.tiles.tissue_tiled is None else {"tissue_tiled": self.tiles.tissue_tiled})


def available_memory() -> int | None:
    """Bytes this machine can still give (Linux MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(slide, n_tiles: int, *, size: int, level_ds: float, patch: int,
                    n_genes: int, batch_size: int, workers: int,
                    views: tuple[int, ...] = ()) -> int:  # fmt: skip
    """Peak bytes of the run's slide-sized parts: the decoded image (plain images are
    decoded whole), ``workers + 2`` batches of patches in flight (uint8 and the float32
    model input; 3 channels per view), each reader's largest level region (RGBA), and
    the predictions (twice: the array and the AnnData written from it)."""
    ch = 3 * (1 + len(views))
    in_flight = (workers + 2) * batch_size * patch * patch * ch + batch_size * ch * patch**2 * 4
    regions = workers * 4 * int(max((size, *views)) / level_ds + 1) ** 2
    preds = 2 * n_tiles * n_genes * 4 + n_tiles * 96  # float32 + centres and ids
    return int(slide.decoded_bytes() + in_flight + regions + preds)


def check_memory(need: int, source: str, what: str) -> None:
    have = available_memory()
    if have is not None and need > have:
        msg = (
            f"{source}: the run needs about {need / GiB:.1f} GiB ({what}) and "
            f"{have / GiB:.1f} GiB is available"
        )
        raise MemoryError(msg)


def make_plan(slide, where, pre, *, n_genes: int, stride: int | None = None,
         max_tiles: int | None = MAX_TILES, batch_size: int = 64, workers: int = 2,
         source: str = "") -> Plan:  # fmt: skip
    """Tile size, resampling, read level, tiles and memory of a run; refusals first."""
    source = source or str(slide.path)
    max_tiles = max_tiles or MAX_TILES
    size = tile_size(pre, where.mpp, source, where.found)
    factor = check_resampling(size, pre, where.mpp, source)
    level = slide.level_for(factor)
    ds = slide.level_downsamples[level]
    views = view_sizes(pre, where.mpp, source)  # refused before the tissue is found
    mem = dict(size=size, level_ds=ds, patch=pre.patch_size, n_genes=n_genes,
               batch_size=batch_size, workers=workers, views=views)  # fmt: skip
    if slide.decoded_bytes():  # the tissue grid decodes a plain image: check it first
        check_memory(estimate_memory(slide, 0, **mem), source, "the decoded image")
    tiles = where.tiles(slide, size=size, stride=stride, max_tiles=max_tiles)
    tiles.views = views
    need = estimate_memory(slide, len(tiles), **mem)
    check_memory(need, source, f"{len(tiles):,} tiles x {n_genes} genes, image and patches")
    return Plan(tiles, pre.patch_size, factor, level, ds, need)


def view_sizes(pre, mpp: float | None, source: str) -> tuple[int, ...]:
    """Level-0 sides of the wider fields of view a model reads around each tile
    (``pre.views_um``, ``--context-fov``): the rule training cut them by
    (:func:`mclx.data.patches.source_size`), on the slide's µm/px ``mpp``; refused in
    one line when that is unknown."""
    from mclx.data.patches import source_size

    if pre.views_um and not mpp:
        msg = (
            f"{source}: the slide's µm/px is unknown, so the model's {pre.views_um[0]:g} µm "
            "field of view (--context-fov) has no scale: pass --mpp"
        )
        raise DataError(msg)
    return tuple(source_size(pre.patch_size, None, mpp, source, w) for w in pre.views_um)


@dataclass
class Where:
    """Where the tiles go, known before a pixel is read: given spots, or the slide's
    tissue grid; and the slide's µm/px (its metadata, --mpp, or the spots' array grid)
    with where it came from, or what the metadata said when it was not believed."""

    spots: Any = None
    kind: str = ""
    mpp: float | None = None
    mpp_source: str = "none"
    found: str = ""
    source: str = ""  # the spot file, or the slide: what messages about the tiles name
    note: str = ""  # what the run says it read (a Space Ranger folder's image and spots)

    @classmethod
    def find(cls, slide, spots) -> Where:
        from mclx.data.readers import read_spots, spot_mpp

        res = slide.resolution
        if spots is None:
            return cls(mpp=res.mpp, mpp_source=res.source, found=res.found, source=str(slide.path))
        spot_df, kind = read_spots(spots)
        if res.mpp is not None:
            return cls(spot_df, kind, res.mpp, res.source, source=str(spots))
        grid = spot_mpp(spot_df, kind)
        how = f"spot grid ({kind})" if grid else "none"
        return cls(spot_df, kind, grid, how, res.found, str(spots))

    @classmethod
    def from_spaceranger(cls, slide, spots) -> Where:
        """The spots of a Space Ranger folder given as the slide, on the image read."""
        found = slide.spaceranger
        if spots is not None:
            msg = (
                f"{found.folder}: a Space Ranger folder brings its own spots "
                f"({found.positions.name}); drop --spots, or give an image file with --spots"
            )
            raise DataError(msg)
        frame = found.spots()
        res = slide.resolution
        return cls(frame, "visium", res.mpp, res.source, res.found, str(found.positions),
                   note=found.describe(len(frame)))  # fmt: skip

    def spot_diameter(self, tile_side: float) -> float:
        """A spot's diameter in level-0 px, as the data's array makes it (her2st and
        legacy ST 100 µm, Visium 55 µm); the tile side for a tissue grid or spots of
        unknown size (a CSV of x, y)."""
        um = self.spots.attrs.get("spot_diameter_um") if self.spots is not None else None
        return float(um) / self.mpp if um and self.mpp else float(tile_side)

    @property
    def origin(self) -> str:
        return f"spots:{self.kind}" if self.spots is not None else "tissue grid"

    def tiles(self, slide, *, size: int, stride: int | None, max_tiles: int | None = None):
        from mclx.wsi.tiling import grid_tiles, slide_tissue, spot_tiles

        if self.spots is None:
            return grid_tiles(
                slide, size=size, stride=stride, tissue=slide_tissue(slide), max_tiles=max_tiles
            )
        if max_tiles is not None and len(self.spots) > max_tiles:
            msg = f"{self.source}: {len(self.spots):,} spots, more than --max-tiles {max_tiles:,}"
            raise DataError(msg)
        return spot_tiles(slide, self.spots, size=size, source=self.source, kind=self.kind)


def locate(slide_path: str | os.PathLike, *, spots=None, mpp: float | None = None):
    """The open slide (its header read) and where its tiles go (:class:`Where`); the
    slide is closed again when the spots fail."""
    from mclx.data.slide import open_slide

    slide = open_slide(slide_path, mpp=mpp)
    try:
        if slide.spaceranger is not None:
            return slide, Where.from_spaceranger(slide, spots)
        return slide, Where.find(slide, spots)
    except BaseException:
        slide.close()
        raise


def slide_record(slide_path, slide, where: Where, work) -> dict:
    """The slide's part of ``uns["mclx"]``: the file, its reader, µm/px and the plan,
    and what tells it from another slide (:func:`mclx.data.slide.slide_signature`)."""
    from mclx.data.slide import slide_signature

    return {
        "slide": str(Path(slide_path).resolve()),
        **slide_signature(slide),
        "slide_reader": slide.backend,
        "slide_vendor": slide.vendor,
        "slide_mpp": where.mpp or -1.0,
        "slide_mpp_source": where.mpp_source,
        "slide_mpp_found": where.found,
        **work.record(),
        "spot_diameter_level0": where.spot_diameter(work.tiles.size),
        "tiles_from": where.origin,
    }
