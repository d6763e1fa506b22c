"""What ``mclx infer`` writes beside the predictions, for the tools people open it with:
PNG maps (:func:`mclx.wsi.writer.plot_genes`), GeoJSON for QuPath (:mod:`mclx.wsi.geojson`) and a
SpatialData store (:mod:`mclx.wsi.sdata`). Checked before any work, written after it (inside
the command's all-or-nothing block, with the ``.h5ad``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SPATIALDATA_MARKERS = ("zarr.json", ".zgroup")  # a zarr store's root (v3, v2)


@dataclass(frozen=True)
class Outputs:
    """The extra outputs asked for; ``out`` is the predictions' path (plots beside it)."""

    out: Path
    plot: Sequence[str] = ()
    geojson: Path | None = None
    geojson_genes: int | None = None
    spatialdata: Path | None = None

    def check(self) -> None:
        """Fail now when an output cannot be written or its library is missing."""
        from mclx.files import check_output, check_output_folder

        if self.geojson_genes is not None and self.geojson is None:
            msg = "--geojson-genes needs --geojson"
            raise ValueError(msg)
        if self.geojson is not None:
            check_output(self.geojson)
        if self.spatialdata is not None:
            from mclx.wsi.sdata import require_spatialdata

            require_spatialdata()
            check_output_folder(
                self.spatialdata, marker=SPATIALDATA_MARKERS, what="a SpatialData store"
            )

    def write(self, adata, slide: Path, *, mpp: float | None = None) -> list[Path]:
        """Write every output asked for; their paths."""
        from mclx.wsi.writer import library_id, plot_genes

        paths: list[Path] = []
        if self.plot:
            paths += plot_genes(adata, slide, self.plot, self.out.with_suffix(""), mpp=mpp)
        if self.geojson is not None:
            from mclx.wsi.geojson import write_geojson

            paths.append(write_geojson(adata, self.geojson, top=self.geojson_genes))
        if self.spatialdata is not None:
            from mclx.wsi.sdata import write_spatialdata

            paths.append(write_spatialdata(adata, self.spatialdata, library=library_id(slide)))
        return paths
