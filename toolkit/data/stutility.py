"""Reader for legacy ST data as STUtility ships it (``inst/extdata/counts``): per section
``NAME.tsv`` (or ``.tsv.gz``) counts, spots x genes with ``XxY`` spot ids; the spot
detector's ``alignment_table_NAME.tsv`` (``x y new_x new_y pixel_x pixel_y selected``,
pixels of the section's image); and ``NAME.jpg`` (or .png/.tif), the H&E image.

Genes are whatever the counts have (Ensembl ids for STUtility's mouse data), renamed to
the symbols of a feature file beside them when there is one (``NAME.features.tsv`` or
``features.tsv``: :mod:`mclx.data.genenames`), the IDs kept in ``var["gene_ids"]``. The array
(1k or the staggered 2k, :mod:`mclx.data.arrays`) is detected from the spot coordinates
of the whole alignment table, so the µm/px estimate uses the right pitch; ``--mpp``
overrides it.
"""

from __future__ import annotations

import re
from pathlib import Path

from mclx.data.arrays import st_grid_mpp
from mclx.data.genenames import feature_file, name_genes, read_feature_names
from mclx.data.her2st import IMAGE_SUFFIXES, st_section
from mclx.data.layout import Reader, first_existing, register
from mclx.data.spotfiles import READ_ERRORS, read_selection

ALIGNMENT = re.compile(r"^alignment_table_(.+)\.tsv(\.gz)?$")


@register
class StutilityReader(Reader):
    """Legacy ST / STUtility files in one folder (see the module docstring)."""

    name = "stutility"
    looks_for = "alignment_table_NAME.tsv beside NAME.tsv counts"

    @classmethod
    def find(cls, path: Path) -> Path | None:
        if not path.is_dir():
            return None
        for p in path.iterdir():
            m = ALIGNMENT.match(p.name)
            if m and first_existing(path, (f"{m[1]}.tsv", f"{m[1]}.tsv.gz")):
                return path
        return None

    def _all_sections(self) -> list[str]:
        names = (ALIGNMENT.match(p.name) for p in self.root.iterdir())
        return sorted(m[1] for m in names if m and self._counts(m[1]) is not None)

    def _counts(self, section: str) -> Path | None:
        return first_existing(self.root, (f"{section}.tsv", f"{section}.tsv.gz"))

    def _alignment(self, section: str) -> Path:
        found = first_existing(
            self.root, (f"alignment_table_{section}.tsv", f"alignment_table_{section}.tsv.gz")
        )
        return found or self.root / f"alignment_table_{section}.tsv"

    def image_path(self, section: str) -> Path | None:
        if section in self.images:
            return self.images[section]
        return first_existing(self.root, [section + s for s in IMAGE_SUFFIXES])

    def image_candidates(self, section: str) -> list[Path]:
        return [self.root / (section + s) for s in IMAGE_SUFFIXES]

    def array(self, section: str) -> str:
        """1k or 2k, from every position of the alignment table (tissue or not)."""
        import pandas as pd

        from mclx.data.arrays import detect_st_array

        path = self._alignment(section)
        try:
            table = pd.read_csv(path, sep="\t", usecols=["x", "y"])
        except (*READ_ERRORS, KeyError):
            table = read_selection(path)  # its own one-line error, or the selected spots
        return detect_st_array(table["x"].to_numpy(), table["y"].to_numpy())

    def extent(self) -> tuple[int, int]:
        spots = [read_selection(self._alignment(s)) for s in self.sections()]
        return (
            max([0, *(int(t["x"].max()) for t in spots)]) + 1,
            max([0, *(int(t["y"].max()) for t in spots)]) + 1,
        )

    def read_section(self, section: str):
        counts = self._counts(section)
        if counts is None:
            msg = f"{self.root}: no counts file {section}.tsv for section {section!r}"
            raise FileNotFoundError(msg)
        spots, image = self._alignment(section), self.image_path(section)
        adata = st_section(section, counts, spots, image)
        features = feature_file(self.root, section)
        if features is not None:  # symbols users type, the IDs beside them
            name_genes(adata, read_feature_names(features))
        array = self.array(section)
        return self.finish(
            adata,
            section,
            array=array,
            image=image,
            mpp=self.full_mpp(st_grid_mpp(adata.obs, array)),
            counts_path=counts,
            spots_path=spots,
        )
