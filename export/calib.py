"""Real patches for parity checks and INT8 calibration.

``source`` may be a her2st-layout folder (patches at the spots of its image sections), a
folder of image files (central patch of each), or None (uniform random pixels, which
says little about accuracy on tissue: pass real data when you can).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mclx.data.her2st import IMAGE_SUFFIXES


def calibration_patches(
    source: str | os.PathLike | None, *, n: int = 64, size: int = 224, seed: int = 0,
    pre=None,
) -> tuple[np.ndarray, str]:  # fmt: skip
    """``n`` uint8 NHWC patches and a short description of where they came from. For a
    model that also reads wider fields of view (``pre.views_um``), each patch carries
    them on the channel axis, cut at ``pre``'s scale from her2st sections (random pixels
    for each view without a source; a folder of plain images, whose scale is unknown,
    is refused)."""
    rng = np.random.default_rng(seed)
    views = len(pre.views_um) if pre is not None else 0
    if source is None:
        shape = (n, size, size, 3 if pre is None else pre.channels())
        return rng.integers(0, 256, size=shape, dtype=np.uint8), "random pixels"
    path = Path(source)
    if not path.exists():
        msg = f"{path}: calibration data does not exist"
        raise FileNotFoundError(msg)
    if _is_her2st(path):
        from mclx.data.her2st import list_sections, read_section
        from mclx.data.patches import model_patches, section_patches

        sections = list_sections(path, with_image=True)
        if not sections:
            msg = f"{path}: no section with an image for calibration"
            raise FileNotFoundError(msg)
        per = max(1, -(-n // len(sections)))
        parts = []
        for s in sections:
            a = read_section(path, s)
            p = model_patches(a, pre) if views else section_patches(a, size)
            parts.append(p[rng.choice(len(p), size=min(per, len(p)), replace=False)])
        return np.concatenate(parts)[:n], f"{len(sections)} her2st sections under {path}"
    from mclx.data.patches import extract_patches
    from mclx.data.slide import load_image

    if views:
        msg = (
            f"{path}: a folder of images has no µm/px, so the model's wider field of view "
            f"({pre.views_um[0]:g} µm) cannot be cut from it: pass a her2st-layout folder"
        )
        raise ValueError(msg)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        msg = f"{path}: no image files for calibration"
        raise FileNotFoundError(msg)
    patches = []
    for f in files:
        img = load_image(f)
        h, w = img.shape[:2]
        centres = rng.uniform([0, 0], [w, h], size=(max(1, n // len(files)), 2))
        patches.append(extract_patches(img, centres, size))
    return np.concatenate(patches)[:n], f"{len(files)} images under {path}"


@dataclass
class CalibrationSet:
    """What one export checks and calibrates on.

    Attributes:
        patches: the held-back spots' uint8 patches: the parity (and gate) queries.
        calib: the INT8 calibration patches, other spots than ``patches`` where the data
            has enough of them (the same patches otherwise).
        source: where they came from, in words.
        truth: the held-back spots' measured expression over the checkpoint's genes
            (preprocessed as in training); None without expression (images, pixels).
        bank: the other spots of the same sections embedded by the checkpoint's spot
            encoder (a :class:`~mclx.bank.Bank`), which the gate retrieves from; None
            without expression or for a model that needs no bank.
    """

    patches: np.ndarray
    calib: np.ndarray
    source: str
    truth: np.ndarray | None = None
    bank: Any = None


def calibration_set(
    source: str | os.PathLike | None, ck, *, n: int = 64, n_calib: int | None = None, seed: int = 0
) -> CalibrationSet:
    """``n`` held-back spots for the parity gate and ``n_calib`` (default ``n``) other
    spots for INT8 calibration; from a her2st-layout folder also the held-back spots'
    measured expression and a bank of the remaining spots (see :mod:`mclx.export.gate`)."""
    n_calib = n if n_calib is None else n_calib
    size = ck.preprocess.patch_size
    if source is None or not _is_her2st(Path(source)):
        got, where = calibration_patches(source, n=n + n_calib, size=size, seed=seed,
                                         pre=ck.preprocess)  # fmt: skip
        split = got[:n] if len(got) > n else got
        rest = got[n:] if len(got) > n else got
        return CalibrationSet(split, rest, where)
    return _her2st_set(Path(source), ck, n, n_calib, seed)


def _is_her2st(path: Path) -> bool:
    return (path / "ST-cnts").is_dir() or (path / "data" / "ST-cnts").is_dir()


def _her2st_set(path: Path, ck, n: int, n_calib: int, seed: int) -> CalibrationSet:
    """Spots of every image section under ``path``: ``n`` held back (spread over the
    sections), ``n_calib`` others for calibration, and every spot not held back in the bank."""
    from mclx.bank import bank_from_model, image_bank
    from mclx.data.dataset import build_table
    from mclx.data.her2st import list_sections, read_section

    rng = np.random.default_rng(seed)
    names = list_sections(path, with_image=True)
    if not names:
        msg = f"{path}: no section with an image for calibration"
        raise FileNotFoundError(msg)
    adatas = {s: read_section(path, s) for s in names}
    pre = ck.preprocess
    if any(not set(pre.genes) <= set(a.var_names) for a in adatas.values()):
        got, where = calibration_patches(path, n=n + n_calib, size=pre.patch_size, seed=seed,
                                         pre=pre)  # fmt: skip
        where += " (without the checkpoint's genes: no task to judge)"
        return CalibrationSet(got[:n], got[n:] if len(got) > n else got, where)
    table = build_table(adatas, pre)
    order = _spread(table.section, rng)
    held, cal = order[:n], order[n : n + n_calib]
    if len(cal) == 0:  # a dataset too small to hold any back: calibrate on the same spots
        cal = held
    patches = _cut(adatas, table, np.concatenate([held, cal]), pre)
    where = f"{len(held)} held-back spots of {len(names)} her2st sections under {path}"
    bank = None
    if getattr(ck.model, "kind", "") == "contrastive" and not image_bank(ck.model):
        keep = np.setdiff1d(np.arange(len(table)), held)
        bank = bank_from_model(ck.model, _rows(table, keep), pre.genes, fingerprint=ck.fingerprint)
    cut = patches[: len(held)], patches[len(held) :]
    return CalibrationSet(cut[0], cut[1], where, table.expr[held], bank)


def _spread(sections: np.ndarray, rng) -> np.ndarray:
    """Every row in an order that takes the sections in turn, each in random order."""
    per = [rng.permutation(np.flatnonzero(sections == s)) for s in dict.fromkeys(sections)]
    width = max(len(p) for p in per)
    grid = np.full((len(per), width), -1)
    for i, p in enumerate(per):
        grid[i, : len(p)] = p
    flat = grid.T.reshape(-1)
    return flat[flat >= 0]


def _rows(table, rows: np.ndarray):
    """The spots ``rows`` of ``table`` (sections kept whole in order: the spot encoder's
    attention sees the section's remaining spots)."""
    from mclx.data.dataset import SpotTable

    return SpotTable(
        expr=table.expr[rows],
        pos=table.pos[rows],
        coords=table.coords[rows],
        section=table.section[rows],
        obs_names=table.obs_names[rows],
    )


def _cut(adatas, table, rows: np.ndarray, pre) -> np.ndarray:
    """The patches of ``table``'s spots ``rows`` (in that order), each section's cut once."""
    from mclx.data.patches import model_patches

    out = np.zeros((len(rows), pre.patch_size, pre.patch_size, pre.channels()), np.uint8)
    for name, a in adatas.items():
        mine = np.flatnonzero(table.section[rows] == name)
        if len(mine):
            local = rows[mine] - np.flatnonzero(table.section == name)[0]
            out[mine] = model_patches(a[local], pre)
    return out
