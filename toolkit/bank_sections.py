"""Which sections a bank holds, by their images: what ``mclx bank build`` records of
each section's image (its size and sha256) and how ``mclx infer`` knows that its slide
is one of them (:func:`slide_in_bank`), by content or, for banks without the hashes, by
name. A slide in the bank is predicted from its own measured spots: a leak."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mclx.training.feature_store import file_digest


def section_images(adatas: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """Each section's image file: its size in bytes and sha256 (sections without one
    are left out)."""
    out = {}
    for name, a in adatas.items():
        image = a.uns.get("image_path")
        if image and Path(image).is_file():
            out[str(name)] = (Path(image).stat().st_size, file_digest(image))
    return out


def slide_in_bank(bank: Any, slide_path: str | os.PathLike, image: str | os.PathLike) -> str:
    """Why the slide (``slide_path`` as given; ``image`` the file read) is one of the
    bank's sections, or "": its image has the bytes of a section's image (size, then
    sha256), or (a bank without image hashes, or a slide not in it) its name is a
    section's (the file or folder name stem, or a Space Ranger folder's name)."""
    image = Path(image)
    if image.is_file() and bank.images:
        size = image.stat().st_size
        same = [s for s, (n, _) in bank.images.items() if n == size]
        if same:
            digest = file_digest(image)
            for s in same:
                if bank.images[s][1] == digest:
                    return f"{image.name} has the bytes of section {s}'s image"
    given = Path(slide_path)
    names = {given.stem, image.stem, given.name}
    if given.name == "outs":
        names.add(given.parent.name)
    held = sorted(names & set(map(str, np.unique(bank.sections))))
    return f"it is named like the bank's section {held[0]}" if held else ""


def read_images(data: dict[str, np.ndarray]) -> dict[str, tuple[int, str]]:
    """The sections' image sizes and hashes ({} for a bank of an mclx before them, or
    arrays that disagree: the warning then goes by section names)."""
    try:
        names, sizes, hashes = (data[k] for k in ("image_sections", "image_bytes", "image_sha256"))
        if not len(names) == len(sizes) == len(hashes):
            return {}
        return {str(s): (int(n), str(h)) for s, n, h in zip(names, sizes, hashes)}
    except (KeyError, TypeError, ValueError):
        return {}


def gene_ids(adatas: dict[str, Any], genes: list[str]) -> list[str]:
    """The IDs of ``genes`` that the sections carry beside their names
    (``var["gene_ids"]``), "" for a gene without; [] when no section has IDs."""
    ids: dict[str, str] = {}
    for a in adatas.values():
        if "gene_ids" in a.var:
            ids.update({str(g): str(i) for g, i in zip(a.var_names, a.var["gene_ids"])})
    return [ids.get(g, "") for g in genes] if ids else []
