"""Spot bank: spot embeddings and expressions that image queries are matched against.

A bank is an ``.npz`` file::

    format="mclx-bank", format_version=1,
    embeddings (N, D) float32   raw (unnormalised) spot embeddings
    expressions (N, G) float32  preprocessed expression, the values that get averaged
    genes (G,), sections (N,), spot_ids (N,), coords (N, 2) pixels, positions (N, 2) array
    fingerprint, checkpoint (path), model (name), k, distance, weighting (defaults)

Any section with counts can join a bank: the spot encoder needs no image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mclx.errors import FingerprintMismatch, FormatError
from mclx.io import atomic_path

FORMAT = "mclx-bank"
FORMAT_VERSION = 1
_ARRAYS = ("embeddings", "expressions", "genes", "sections", "spot_ids", "coords", "positions")


@dataclass
class Bank:
    """A loaded bank. ``embeddings`` / ``expressions`` are numpy or (after
    :meth:`to_device`) CuPy arrays."""

    embeddings: Any
    expressions: Any
    genes: list[str]
    sections: np.ndarray
    spot_ids: np.ndarray
    coords: np.ndarray
    positions: np.ndarray
    fingerprint: str
    checkpoint: str
    model: str
    k: int
    distance: str
    weighting: str
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def check_compatible(self, fingerprint: str, genes: Sequence[str] | None = None) -> None:
        """Refuse an encoder from another checkpoint, or other genes."""
        where = self.path or "bank"
        if fingerprint != self.fingerprint:
            msg = (
                f"{where}: bank was built from checkpoint {self.fingerprint} but the encoder "
                f"is {fingerprint}; rebuild the bank with 'mclx bank build'"
            )
            raise FingerprintMismatch(msg)
        if genes is not None and list(genes) != self.genes:
            msg = f"{where}: bank genes differ from the checkpoint's gene list"
            raise FingerprintMismatch(msg)

    def to_device(self, device: str = "cuda", *, dtype: str = "float32") -> Bank:
        """Copy embeddings and expressions to GPU memory as CuPy arrays.

        ``dtype="float16"`` halves the bank's memory; the kernel computes in float32.
        """
        if device == "cpu":
            return self
        try:
            import cupy as cp

            cp.cuda.runtime.getDeviceCount()
        except Exception as exc:  # ImportError, CUDARuntimeError
            msg = f"{self.path or 'bank'}: device {device!r} needs CuPy and a CUDA GPU ({exc})"
            raise RuntimeError(msg) from exc
        emb = cp.asarray(self.embeddings, dtype=dtype)
        expr = cp.asarray(self.expressions, dtype=dtype)
        return Bank(**{**self.__dict__, "embeddings": emb, "expressions": expr})


def build_bank(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    *,
    sections: Sequence[str] | None = None,
    seq_len: int | None = None,
) -> Bank:
    """Embed every spot of ``sections`` (default: all) with the checkpoint's spot encoder."""
    from mclx.checkpoint import load_checkpoint
    from mclx.data.dataset import build_table
    from mclx.data.her2st import read_her2st
    from mclx.train import spot_embeddings

    ck = load_checkpoint(checkpoint)
    if ck.model.kind != "contrastive":
        msg = f"{checkpoint}: a {ck.model_cfg.name} model predicts directly and needs no bank"
        raise FormatError(msg)
    adatas = read_her2st(data, list(sections) if sections else None)
    table = build_table(adatas, ck.preprocess)
    seq = seq_len or int(ck.provenance.get("train", {}).get("batch_size", 128))
    emb = spot_embeddings(ck.model, table, seq_len=seq)
    cfg = ck.model_cfg
    return Bank(
        embeddings=emb,
        expressions=table.expr,
        genes=list(ck.preprocess.genes),
        sections=table.section.astype(str),
        spot_ids=table.obs_names.astype(str),
        coords=table.coords,
        positions=table.pos,
        fingerprint=ck.fingerprint,
        checkpoint=str(Path(checkpoint).resolve()),
        model=cfg.name,
        k=cfg.k,
        distance=cfg.distance,
        weighting=cfg.weighting,
    )


def save_bank(bank: Bank, path: str | os.PathLike) -> Path:
    """Write ``bank`` atomically as ``.npz``."""
    path = Path(path)
    arrays = {
        "format": np.array(FORMAT),
        "format_version": np.array(FORMAT_VERSION),
        "embeddings": np.asarray(bank.embeddings, np.float32),
        "expressions": np.asarray(bank.expressions, np.float32),
        "genes": np.array(bank.genes, dtype=str),
        "sections": np.asarray(bank.sections, str),
        "spot_ids": np.asarray(bank.spot_ids, str),
        "coords": np.asarray(bank.coords, np.float64),
        "positions": np.asarray(bank.positions, np.int64),
        "fingerprint": np.array(bank.fingerprint),
        "checkpoint": np.array(bank.checkpoint),
        "model": np.array(bank.model),
        "k": np.array(bank.k),
        "distance": np.array(bank.distance),
        "weighting": np.array(bank.weighting),
    }
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def load_bank(path: str | os.PathLike) -> Bank:
    """Read and validate a bank file."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: bank does not exist"
        raise FileNotFoundError(msg)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {key: z[key] for key in z.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError, EOFError
        msg = f"{path}: not a readable bank file ({exc.__class__.__name__})"
        raise FormatError(msg) from exc
    if str(data.get("format", "")) != FORMAT:
        msg = f"{path}: not an mclx bank (no '{FORMAT}' format tag)"
        raise FormatError(msg)
    version = int(data.get("format_version", -1))
    if version > FORMAT_VERSION:
        msg = f"{path}: bank format version {version} is newer than supported ({FORMAT_VERSION})"
        raise FormatError(msg)
    missing = [a for a in (*_ARRAYS, "fingerprint") if a not in data]
    if missing:
        msg = f"{path}: bank lacks {missing}"
        raise FormatError(msg)
    emb, expr = data["embeddings"], data["expressions"]
    n = emb.shape[0]
    if n == 0:
        msg = f"{path}: bank is empty (0 spots)"
        raise FormatError(msg)
    if emb.ndim != 2 or expr.shape != (n, len(data["genes"])) or len(data["sections"]) != n:
        msg = f"{path}: bank arrays disagree in shape"
        raise FormatError(msg)
    if not (np.isfinite(emb).all() and np.isfinite(expr).all()):
        msg = f"{path}: bank contains NaN or infinite values"
        raise FormatError(msg)
    return Bank(
        embeddings=emb.astype(np.float32, copy=False),
        expressions=expr.astype(np.float32, copy=False),
        genes=[str(g) for g in data["genes"]],
        sections=data["sections"],
        spot_ids=data["spot_ids"],
        coords=data["coords"],
        positions=data["positions"],
        fingerprint=str(data["fingerprint"]),
        checkpoint=str(data.get("checkpoint", "")),
        model=str(data.get("model", "mclstexp")),
        k=int(data.get("k", 200)),
        distance=str(data.get("distance", "l2")),
        weighting=str(data.get("weighting", "inverse_square")),
        path=path,
    )
