"""A Space Ranger ``outs/`` folder given as a slide (``mclx infer OUTS/``): which image
to read, where its spots are on it and its µm/px.

Most shared Visium data is an ``outs/`` folder without the full-resolution image:
``spatial/tissue_hires_image.png``, ``scalefactors_json.json`` and the tissue positions
(in full-resolution pixels). :func:`spaceranger_image` picks the full-resolution image when
the folder has one (one image file beside ``spatial/``), else the hires image (else the
lowres one) with its scale factor; the µm/px comes from ``spot_diameter_fullres``, which
Space Ranger documents as the full-resolution pixels across "a theoretical 65 µm spot"
(the 55 µm spot plus its margin; it agrees with the 100 µm spot pitch within 2% on the
fixture), divided by the scale factor of the image read. Spots are drawn at 55 µm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mclx.data.arrays import SPOT_DIAMETER_UM
from mclx.data.jsonfile import json_object
from mclx.errors import DataError

POSITIONS = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
SCALEFACTORS = "scalefactors_json.json"
DOWNSCALED = (("hires", "tissue_hires_image.png"), ("lowres", "tissue_lowres_image.png"))
FULLRES_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ndpi", ".qptiff", ".jpg", ".jpeg", ".png")
VISIUM_SPOT_UM = SPOT_DIAMETER_UM["visium"]  # what is drawn
FULLRES_DIAMETER_UM = 65.0  # what spot_diameter_fullres spans (Space Ranger's documentation)


@dataclass(frozen=True)
class SpaceRangerImage:
    """The image of an outs folder to read (``kind``: fullres, hires or lowres), its
    image px per full-resolution px (``scale``), its µm/px from the spot diameter, and
    the in-tissue spots on it (``id, x, y, array_x, array_y``)."""

    folder: Path
    image: Path
    kind: str
    scale: float
    mpp: float | None
    positions: Path

    def spots(self) -> pd.DataFrame:
        from mclx.data.spotfiles import positions_frame, read_positions_file

        frame = positions_frame(read_positions_file(self.positions), self.positions)
        frame["x"] *= self.scale
        frame["y"] *= self.scale
        grid = frame.attrs.get("mpp")  # from the array grid, in full-resolution pixels
        frame.attrs["mpp"] = self.mpp or (grid / self.scale if grid else None)
        frame.attrs["spot_diameter_um"] = VISIUM_SPOT_UM
        return frame

    def describe(self, n_spots: int) -> str:
        how = "" if self.kind == "fullres" else f", spots scaled by its factor {self.scale:g}"
        mpp = f", {self.mpp:.4g} µm/px from spot_diameter_fullres" if self.mpp else ""
        return (
            f"mclx: Space Ranger folder {self.folder}: reading {self.image.name} ({self.kind}"
            f"{how}{mpp}), {n_spots} in-tissue spots from {self.positions.name}"
        )


def spatial_folder(folder: Path) -> Path | None:
    """``spatial/`` of an outs folder (``folder`` itself or ``folder/outs``) holding tissue
    positions; None when ``folder`` is not one."""
    for outs in (folder, folder / "outs"):
        spatial = outs / "spatial"
        if spatial.is_dir() and any((spatial / n).is_file() for n in POSITIONS):
            return spatial
    return None


def scalefactors(spatial: Path) -> dict:
    """``scalefactors_json.json`` of ``spatial/`` ({} when absent)."""
    return json_object(spatial / SCALEFACTORS, "scale factors")


def scale_factor(spatial: Path, kind: str, *, instead: str = "") -> float:
    """``tissue_{kind}_scalef`` of ``spatial/scalefactors_json.json``: image px per
    full-resolution px. The one reader of the factor (the outs folder given as a slide,
    :mod:`mclx.data.visium`); its errors name the file and why it is needed, then
    ``instead``: what else the caller's user could give."""
    path = spatial / SCALEFACTORS
    need = f"needed to place the spots on the {kind} image" + (f"; {instead}" if instead else "")
    if not path.is_file():
        msg = f"{path}: missing ({need})"
        raise FileNotFoundError(msg)
    key = f"tissue_{kind}_scalef"
    factors = scalefactors(spatial)  # unreadable, or not an object: a DataError of its own
    try:
        value = float(factors[key])
    except (KeyError, TypeError, ValueError) as exc:
        msg = f"{path}: no valid {key} ({need})"
        raise DataError(msg) from exc
    if not value > 0:
        msg = f"{path}: {key} must be positive (got {value})"
        raise DataError(msg)
    return value


def spaceranger_image(folder: Path) -> SpaceRangerImage | None:
    """What to read of an outs folder given as a slide; None when it is not one."""
    spatial = spatial_folder(folder)
    if spatial is None:
        return None
    positions = next(spatial / n for n in POSITIONS if (spatial / n).is_file())
    factors = scalefactors(spatial)
    full = [p for p in sorted(spatial.parent.iterdir()) if p.suffix.lower() in FULLRES_SUFFIXES]
    if len(full) == 1 and full[0].is_file():
        image, kind, scale = full[0], "fullres", 1.0
    else:
        found = [(k, spatial / n) for k, n in DOWNSCALED if (spatial / n).is_file()]
        if not found:
            msg = (
                f"{folder}: a Space Ranger folder without an image (no full-resolution "
                f"image beside spatial/, no {' or '.join(n for _, n in DOWNSCALED)})"
            )
            raise DataError(msg)
        kind, image = found[0]
        instead = "or put the full-resolution image beside spatial/"
        scale = scale_factor(spatial, kind, instead=instead)
    diameter = factors.get("spot_diameter_fullres")
    mpp = None
    if isinstance(diameter, (int, float)) and diameter > 0:
        mpp = FULLRES_DIAMETER_UM / float(diameter) / scale
    return SpaceRangerImage(folder, image, kind, scale, mpp, positions)


def downscaled_hint(image: Path) -> str:
    """Why Visium spots fall outside ``image`` when it is a Space Ranger downscaled image
    (its positions are full-resolution pixels); "" otherwise."""
    for kind, name in DOWNSCALED:
        if image.name == name:
            factors = scalefactors(image.parent) if image.parent.is_dir() else {}
            scalef = factors.get(f"tissue_{kind}_scalef")
            factor = f" (tissue_{kind}_scalef {scalef:g} in {SCALEFACTORS})" if scalef else ""
            outs = image.parent.parent
            return (
                f"; Visium positions are full-resolution pixels and {name} is the {kind} "
                f"image, scaled by its factor{factor}: give the Space Ranger folder "
                f"instead (mclx infer {outs}), which scales the spots"
            )
    return ""
