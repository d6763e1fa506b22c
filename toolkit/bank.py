"""Spot bank: spot embeddings and expressions that image queries are matched against.

A bank is an ``.npz`` file::

    format="mclx-bank", format_version=1,
    embeddings (N, D) float32   raw (unnormalised) spot embeddings
    expressions (N, G) float32  preprocessed expression, the values that get averaged
    genes (G,), sections (N,), spot_ids (N,), coords (N, 2) pixels, positions (N, 2) array
    fingerprint, checkpoint (path), model (name), k, distance, weighting (defaults)
    image_sections, image_bytes, image_sha256 (S,)   each section's image: size, sha256

Any section with counts can join a bank: the spot encoder needs no image. The images'
sizes and hashes (absent from older banks) let ``mclx infer`` warn when its slide is one
of the bank's sections (:mod:`mclx.bank_sections`): it would predict from its own spots.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mclx.artifacts import check_header, require_file, require_keys, unreadable
from mclx.bank_sections import gene_ids, read_images, section_images
from mclx.errors import FingerprintMismatch, FormatError
from mclx.files import atomic_path

FORMAT = "mclx-bank"
FORMAT_VERSION = 1
_ARRAYS = ("embeddings", "expressions", "genes", "sections", "spot_ids", "coords", "positions")


@dataclass
class Bank:
    """A loaded bank. ``embeddings`` / ``expressions`` are numpy arrays or (after
    :meth:`to_device`) CuPy arrays or torch CUDA tensors."""

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
    images: dict[str, tuple[int, str]] = field(default_factory=dict)  # section: size, sha256
    gene_ids: list[str] = field(default_factory=list)  # beside genes, when the data has IDs

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

    def check_k(self, k: int | None = None) -> int:
        """``k`` (default: the bank's own), refused when the bank has fewer spots."""
        k = k or self.k
        if k > len(self):
            msg = f"{self.path or 'bank'}: k={k} is larger than the bank ({len(self)} spots)"
            raise ValueError(msg)
        return k

    def to_device(self, device: str = "cuda") -> Bank:
        """The bank with embeddings and expressions in the memory of GPU ``device``
        (``cuda`` or ``cuda:N``), float32 as on disk: CuPy arrays where CuPy works (the
        CuPy retrieval kernels run on them), else torch CUDA tensors (the torch path:
        CuPy is needed only for its kernels)."""
        from mclx.inference.device import device_index, torch_cuda

        if device == "cpu":
            return self
        index = device_index(device)
        cp = _usable_cupy()
        if cp is not None:
            with cp.cuda.Device(index):
                emb = cp.asarray(self.embeddings, dtype=cp.float32)
                expr = cp.asarray(self.expressions, dtype=cp.float32)
        elif torch_cuda():
            emb = _to_torch(self.embeddings, f"cuda:{index}")
            expr = _to_torch(self.expressions, f"cuda:{index}")
        else:
            where = self.path or "bank"
            msg = f"{where}: device {device!r}: no CUDA GPU visible to CuPy or PyTorch"
            raise RuntimeError(msg)
        return Bank(**{**self.__dict__, "embeddings": emb, "expressions": expr})


def _usable_cupy():
    """The ``cupy`` module when it imports and sees a GPU, else None."""
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() > 0:
            return cp
    except Exception:  # ImportError, CUDARuntimeError without a driver or device
        pass
    return None


def _to_torch(array, device: str):
    """A float32 torch tensor of a host or CuPy array on ``device``."""
    import torch

    return torch.as_tensor(np.asarray(array, np.float32), device=device)


def bank_from_model(
    model,
    table,
    genes: Sequence[str],
    *,
    fingerprint: str,
    checkpoint: str = "",
    features: np.ndarray | None = None,
) -> Bank:
    """A bank of ``table``'s spots (columns ``genes``) embedded by ``model``'s spot
    encoder, in memory; for a model whose bank holds image features (registered with
    ``bank_source="image"``: knn) the pooled ``features`` of the spots' patches, aligned
    with ``table``."""
    from mclx.inference.embed import spot_embeddings

    cfg = model.cfg
    if model.kind != "contrastive":
        msg = f"{checkpoint or 'model'}: a {cfg.name} model predicts directly and needs no bank"
        raise FormatError(msg)
    if image_bank(model):
        if features is None or len(features) != len(table):
            msg = f"{checkpoint or 'model'}: a {cfg.name} bank needs the spots' image features"
            raise ValueError(msg)
        embeddings = np.asarray(features, np.float32)
    else:
        embeddings = spot_embeddings(model, table)
    return Bank(
        embeddings=embeddings,
        expressions=table.expr,
        genes=[str(g) for g in genes],
        sections=table.section.astype(str),
        spot_ids=table.obs_names.astype(str),
        coords=table.coords,
        positions=table.pos,
        fingerprint=fingerprint,
        checkpoint=checkpoint,
        model=cfg.name,
        k=cfg.k,
        distance=cfg.distance,
        weighting=cfg.weighting,
    )


def build_bank(
    checkpoint: str | os.PathLike,
    data: Any,
    *,
    sections: Sequence[str] | None = None,
    progress: bool = False,
) -> Bank:
    """Embed every spot of ``sections`` (default: all) with the checkpoint's spot encoder;
    ``data`` is a data folder of any layout or a :class:`~mclx.data.readers.Reader`;
    ``progress``: a bar over the sections read (and encoded, for an image bank)."""
    from tqdm.auto import tqdm

    from mclx.data.dataset import build_table
    from mclx.data.readers import open_data

    if not Path(checkpoint).exists():  # before reading the data: fail fast
        msg = f"{checkpoint}: checkpoint does not exist"
        raise FileNotFoundError(msg)
    from mclx.checkpoint import read_checkpoint_dict

    model_name = str(read_checkpoint_dict(checkpoint)["model"].get("name", ""))
    images = image_bank(model_name)  # knn embeds patches: image sections only
    reader = open_data(data)
    names = list(sections) if sections else reader.sections(with_image=images)
    adatas = {
        s: reader.read([s], with_image=images)[s]
        for s in tqdm(names, desc="read sections", unit="section", disable=not progress)
    }

    from mclx.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    table = build_table(adatas, ck.preprocess)
    path = str(Path(checkpoint).resolve())
    feats = _image_features(ck, adatas, progress) if images else None
    bank = bank_from_model(
        ck.model,
        table,
        ck.preprocess.genes,
        fingerprint=ck.fingerprint,
        checkpoint=path,
        features=feats,
    )
    bank.images = section_images(adatas)
    bank.gene_ids = gene_ids(adatas, bank.genes)
    return bank


def image_bank(model) -> bool:
    """Whether the bank of ``model`` (a model or a registry name) holds image features of
    its spots (registered with ``bank_source="image"``: knn) rather than embeddings of
    their expression."""
    from mclx.models import MODELS

    name = model if isinstance(model, str) else model.cfg.name
    return name in MODELS and MODELS.meta(name).get("bank_source") == "image"


def _image_features(ck, adatas, progress: bool = False) -> np.ndarray:
    """Every spot's features as the model reads them (sections in ``adatas`` order, as the
    table): :func:`mclx.training.context.section_features` over the training cache."""
    from mclx.training.context import section_features
    from mclx.training.features import PatchCache

    cache = PatchCache(adatas, ck.preprocess.patch_size)
    feats = [section_features(cache, ck.model, s, ck.preprocess, progress=progress) for s in adatas]
    return np.concatenate(feats)


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
        "gene_ids": np.array(bank.gene_ids, dtype=str),
        "image_sections": np.array(list(bank.images), dtype=str),
        "image_bytes": np.array([n for n, _ in bank.images.values()], np.int64),
        "image_sha256": np.array([h for _, h in bank.images.values()], dtype=str),
    }
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def load_bank(path: str | os.PathLike) -> Bank:
    """Read and validate a bank file."""
    path = require_file(path, "bank")
    data = _read_arrays(path)
    check_header(
        path,
        "bank",
        _plain(data.get("format")),
        _plain(data.get("format_version")),
        expected=FORMAT,
        supported=FORMAT_VERSION,
    )
    require_keys(path, "bank", data, (*_ARRAYS, "fingerprint"))
    _check_shapes(path, data)
    _check_values(path, data)
    return Bank(
        embeddings=data["embeddings"].astype(np.float32, copy=False),
        expressions=data["expressions"].astype(np.float32, copy=False),
        genes=[str(g) for g in data["genes"]],
        sections=data["sections"].astype(str),
        spot_ids=data["spot_ids"].astype(str),
        coords=data["coords"].astype(np.float64, copy=False),
        positions=data["positions"],
        path=path,
        images=read_images(data),
        gene_ids=[str(g) for g in data.get("gene_ids", ())] if _same_len(data) else [],
        **_read_defaults(path, data),
    )


def _same_len(data: dict[str, np.ndarray]) -> bool:
    """Whether the bank's gene IDs (optional) are one per gene."""
    ids = data.get("gene_ids")
    return ids is not None and ids.ndim == 1 and len(ids) == len(data["genes"])


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file; :func:`mclx.artifacts.unreadable`'s error when
    numpy refuses it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    except Exception as exc:  # BadZipFile, ValueError, OSError, EOFError; a .npy: no .files
        raise unreadable(
            path,
            "not a readable bank file",
            exc,
            container="a numpy .npz",
            kind=".npz archive",
            detail=exc.__class__.__name__,
        ) from exc


def _plain(arr: np.ndarray | None) -> Any:
    """A 0-d array as its Python value (other arrays and None unchanged)."""
    return arr.item() if isinstance(arr, np.ndarray) and arr.ndim == 0 else arr


def _check_shapes(path: Path, data: dict[str, np.ndarray]) -> None:
    """Refuse arrays of the wrong rank, no spots, or arrays that disagree in length."""
    emb, expr, genes = data["embeddings"], data["expressions"], data["genes"]
    if emb.ndim != 2 or expr.ndim != 2 or genes.ndim != 1:
        msg = f"{path}: bank embeddings and expressions must be 2-d, genes 1-d"
        raise FormatError(msg)
    n = emb.shape[0]
    if n == 0:
        msg = f"{path}: bank is empty (0 spots)"
        raise FormatError(msg)
    shapes = {
        "expressions": (expr.shape, (n, len(genes))),
        "sections": (data["sections"].shape, (n,)),
        "spot_ids": (data["spot_ids"].shape, (n,)),
        "coords": (data["coords"].shape, (n, 2)),
        "positions": (data["positions"].shape, (n, 2)),
    }
    bad = [f"{k} {got} (expected {want})" for k, (got, want) in shapes.items() if got != want]
    if not bad and (emb.shape[1] == 0 or len(genes) == 0):
        bad = ["no embedding dimensions or no genes"]
    if bad:
        msg = f"{path}: bank arrays disagree in shape: {'; '.join(bad)}"
        raise FormatError(msg)


def _check_values(path: Path, data: dict[str, np.ndarray]) -> None:
    """Refuse non-numeric arrays, non-integer positions, and NaN or infinite values."""
    emb, expr = data["embeddings"], data["expressions"]
    numeric = {"embeddings": emb, "expressions": expr, "coords": data["coords"]}
    for key, arr in numeric.items():
        if arr.dtype.kind not in "fiu":
            msg = f"{path}: bank {key} are not numbers ({arr.dtype})"
            raise FormatError(msg)
    if data["positions"].dtype.kind not in "iu":
        msg = f"{path}: bank positions are not integers ({data['positions'].dtype})"
        raise FormatError(msg)
    if not (np.isfinite(emb).all() and np.isfinite(expr).all()):
        msg = f"{path}: bank contains NaN or infinite values"
        raise FormatError(msg)


def _read_defaults(path: Path, data: dict[str, np.ndarray]) -> dict[str, Any]:
    """The bank's fingerprint, checkpoint, model name and query defaults, validated."""
    meta = {
        "fingerprint": _scalar(data, "fingerprint", str),
        "checkpoint": _scalar(data, "checkpoint", str, ""),
        "model": _scalar(data, "model", str, "mclstexp"),
        "k": _scalar(data, "k", int, 200),
        "distance": _scalar(data, "distance", str, "l2"),
        "weighting": _scalar(data, "weighting", str, "inverse_square"),
    }
    bad = [key for key, value in meta.items() if value is None]
    if bad:
        msg = f"{path}: bank field(s) {bad} are not valid scalars"
        raise FormatError(msg)
    if meta["k"] < 1 or meta["distance"] not in ("l1", "l2"):
        msg = f"{path}: bank defaults k={meta['k']} distance={meta['distance']!r} are not valid"
        raise FormatError(msg)
    return meta


_MISSING = object()


def _scalar(data: dict[str, np.ndarray], key: str, kind: type, default: Any = _MISSING):
    """A 0-d array of ``data`` as ``kind`` (str or int); ``default`` when absent, None when
    it is present but not a scalar of that kind."""
    if key not in data:
        return None if default is _MISSING else default
    arr = data[key]
    if arr.ndim != 0:
        return None
    if kind is str:
        return str(arr) if arr.dtype.kind == "U" else None
    return int(arr) if arr.dtype.kind in "iu" else None
