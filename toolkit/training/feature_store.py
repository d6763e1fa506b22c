"""Frozen-encoder features on disk, shared by every command that encodes a section's
spots (``train``, each fold of ``evaluate``, ``bank build`` of an image bank).

An entry is one section's features (pooled, per token, or per dihedral view) under
``mclx.cache.cache_dir("features")``, named by the sha256 of everything that determines
it (:func:`entry_key`): the image file's content, the patch geometry (spot centres, the
source pixels a patch covers, the patch size), the encoder's class and weights, the
pixel normalisation and the feature kind. The content hash of an image is itself cached
by path, size and modification time, so a large image is hashed once.

Writes go to a temporary name and are renamed; an entry that cannot be read is deleted
and rebuilt, never an error; a cache that cannot be written is skipped. The folder is
kept under ``$MCLX_FEATURE_CACHE_GB`` (default 4) by deleting the least recently used
entries. ``MCLX_FEATURE_CACHE=0`` (or ``--no-feature-cache``) turns it off.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mclx.cache import cache_dir

FORMAT = 1  # bump when the patch cutting or the encoding changes what an entry holds
DEFAULT_GB = 4.0
_CHUNK = 1 << 20


@dataclass
class Usage:
    """Which sections a command's features came from: the cache or the encoder."""

    served: list[str] = field(default_factory=list)
    encoded: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """``features: 4 sections from cache`` (empty when nothing was encoded)."""
        served, encoded = len(set(self.served)), len(set(self.encoded))
        if not served and not encoded:
            return ""
        parts = [f"{served} section{'s' * (served != 1)} from cache"] if served else []
        if encoded:
            where = "" if enabled() else " (feature cache off)"
            parts.append(f"{encoded} section{'s' * (encoded != 1)} encoded{where}")
        return "features: " + ", ".join(parts)

    def suffix(self) -> str:
        """``; features: ...`` for the end of a summary line (empty: nothing encoded)."""
        return f"; {self.summary()}" if self.summary() else ""


_USAGE: contextvars.ContextVar[Usage | None] = contextvars.ContextVar("usage", default=None)
_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("off", default=False)


@contextlib.contextmanager
def session(use_cache: bool = True) -> Iterator[Usage]:
    """One command's use of the cache: off with ``use_cache=False``; the yielded
    :class:`Usage` says which sections it served."""
    usage = Usage()
    t_usage, t_off = _USAGE.set(usage), _OFF.set(not use_cache)
    try:
        yield usage
    finally:
        _USAGE.reset(t_usage)
        _OFF.reset(t_off)


def enabled() -> bool:
    """Whether the disk cache is used (not ``MCLX_FEATURE_CACHE=0``, not in a session
    opened with ``use_cache=False``)."""
    env = os.environ.get("MCLX_FEATURE_CACHE", "1").strip().lower()
    return not _OFF.get() and env not in ("0", "no", "off", "false")


def note(section: str, *, served: bool) -> None:
    """Record where ``section``'s features came from, for the summary line."""
    usage = _USAGE.get()
    if usage is not None:
        (usage.served if served else usage.encoded).append(section)


def folder() -> Path:
    return cache_dir("features")


def limit_bytes() -> int:
    """``$MCLX_FEATURE_CACHE_GB`` (default 4) in bytes."""
    try:
        gb = float(os.environ.get("MCLX_FEATURE_CACHE_GB", DEFAULT_GB))
    except ValueError:
        gb = DEFAULT_GB
    return int(max(gb, 0.0) * 1e9)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's content, remembered by (absolute path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    stamp = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    memo = folder() / "hashes" / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".txt")
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = memo.read_text().strip()
        if len(text) == 64:
            return text
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _write(memo, digest.encode())
    return digest


def entry_key(
    image_digest: str,
    centers: np.ndarray,
    source: int,
    patch_size: int,
    encoder: str,
    pre,
    kind: str,
) -> str:
    """The name of an entry: sha256 over the image content, the spot centres (as cut:
    whole pixels), the source and output patch sizes, the encoder (class and weights
    fingerprint), the normalisation (mean, std) and the feature kind."""
    spots = np.ascontiguousarray(np.floor(np.asarray(centers, np.float64)).astype(np.int64))
    parts = {
        "format": FORMAT,
        "image": image_digest,
        "spots": hashlib.sha256(spots.tobytes()).hexdigest(),
        "n_spots": len(spots),
        "source": int(source),
        "patch_size": int(patch_size),
        "encoder": encoder,
        "mean": [float(v) for v in pre.mean],
        "std": [float(v) for v in pre.std],
        "kind": kind,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def section_key(adata, source: int, patch_size: int, encoder: str, pre, kind: str) -> str | None:
    """:func:`entry_key` of a section (None when its image cannot be hashed)."""
    path = adata.uns.get("image_path")
    try:
        digest = file_digest(path) if path else None
    except OSError:
        digest = None
    if digest is None:
        return None
    return entry_key(digest, adata.obsm["spatial"], source, patch_size, encoder, pre, kind)


def load(key: str | None) -> np.ndarray | None:
    """The entry ``key``, or None (absent, unreadable: then deleted); a hit is marked
    recently used."""
    if key is None or not enabled():
        return None
    path = folder() / f"{key}.npy"
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
        with contextlib.suppress(OSError):
            os.utime(path)
        return arr
    except Exception:  # noqa: BLE001 - a torn or foreign file: rebuilt, never an error
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def save(key: str | None, arr: np.ndarray) -> None:
    """Store ``arr`` as entry ``key`` (atomically), then keep the folder under its limit."""
    if key is None or not enabled():
        return
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    if _write(folder() / f"{key}.npy", buf.getvalue()):
        evict(limit_bytes())


def _write(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` through a temporary name; False when it cannot."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


def entries() -> list[tuple[Path, int, float]]:
    """(path, size, mtime) of every entry, oldest use first."""
    rows = []
    with contextlib.suppress(OSError):
        for p in folder().glob("*.npy"):
            with contextlib.suppress(OSError):
                st = p.stat()
                rows.append((p, st.st_size, st.st_mtime))
    return sorted(rows, key=lambda r: r[2])


def evict(limit: int) -> int:
    """Delete the least recently used entries until the folder holds at most ``limit``
    bytes; return how many went."""
    rows = entries()
    total, gone = sum(r[1] for r in rows), 0
    for p, size, _ in rows:
        if total <= limit:
            break
        with contextlib.suppress(OSError):
            p.unlink()
            total -= size
            gone += 1
    return gone


def clear() -> tuple[int, int]:
    """Delete every entry and remembered image hash; return (entries, bytes) freed."""
    rows = entries()
    n = evict(-1)
    with contextlib.suppress(OSError):
        for memo in (folder() / "hashes").glob("*.txt"):
            with contextlib.suppress(OSError):
                memo.unlink()
    return n, sum(r[1] for r in rows)
