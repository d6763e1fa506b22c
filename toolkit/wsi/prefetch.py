"""Tile readers that keep the encoder fed: a pool of threads or of processes.

:func:`prefetch` yields batches of uint8 patches in tile order while ``workers`` readers
decode the next ones (``workers + 1`` batches in flight). Threads share the open slide;
OpenSlide's C decoding releases the GIL, but the Python around each region (PIL
conversion to RGB, resampling, stacking) holds it, which caps threads on many cores.
Processes (``pool="processes"``) open the slide once each and return batches through
pipes (one 64 x 224 x 224 x 3 batch is 9.6 MB): they scale with cores at the cost of a
start-up (~1 s) and a copy. A plain image (PIL) is decoded whole into memory, so its
readers are always threads: processes would each hold a copy.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np

POOLS = ("threads", "processes")

_SLIDE = None  # a process reader's own slide (see _open_in_process)
_OPEN_ERROR: Exception | None = None  # why it could not open it, raised by each read


def _read(slide, crops: Sequence[Sequence[tuple[int, int, int]]], out: int):
    """One batch: per tile its squares (x, y, side) each resized to ``out`` px, the
    views of a tile stacked on the channel axis (:meth:`~mclx.wsi.tiling.Tiles.crops`)."""
    t0 = time.perf_counter()
    batch = np.stack([read_tile(slide, tile, out) for tile in crops])
    return batch, time.perf_counter() - t0


def read_tile(slide, crops: Sequence[tuple[int, int, int]], out: int) -> np.ndarray:
    """One tile's squares (x, y, side), each resized to ``out`` px, stacked on the
    channel axis: (out, out, 3 x len(crops)) uint8."""
    if len(crops) == 1:
        return slide.read(*crops[0], out)
    return np.concatenate([slide.read(x, y, s, out) for x, y, s in crops], axis=-1)


def _open_in_process(path: str, mpp: float | None) -> None:
    """A failing initializer would only break the pool ("a child process terminated
    abruptly"): keep the error for the reads to raise, as one line naming the file."""
    global _SLIDE, _OPEN_ERROR
    from mclx.data.slide import open_slide

    try:
        _SLIDE = open_slide(path, mpp=mpp)
    except Exception as exc:
        _OPEN_ERROR = exc


def _read_in_process(crops, out: int):
    if _OPEN_ERROR is not None:
        raise _OPEN_ERROR
    return _read(_SLIDE, crops, out)


def pool_for(slide, pool: str) -> str:
    """The pool that will read ``slide``: as asked, but threads for a plain image."""
    if pool not in POOLS:
        msg = f"unknown reader pool {pool!r} ({', '.join(POOLS)})"
        raise ValueError(msg)
    return "processes" if pool == "processes" and slide.backend != "pil" else "threads"


def _executor(slide, pool: str, workers: int) -> tuple[Executor, Any]:
    if pool == "processes":
        ex = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),  # no fork of torch's threads
            initializer=_open_in_process,
            initargs=(str(slide.path), slide.mpp),  # reads need no µm/px; kept as given
        )
        return ex, _read_in_process
    return ThreadPoolExecutor(max_workers=workers), lambda *a: _read(slide, *a)


def prefetch(
    slide, tiles, *, out: int, batch_size: int, workers: int, start: int = 0,
    pool: str = "threads",
) -> Iterator[tuple[np.ndarray, float, float]]:  # fmt: skip
    """Batches of uint8 patches in tile order from tile ``start``; yields (batch, read
    seconds, wait seconds). ``pool``: see :func:`pool_for`."""
    n = len(tiles)
    batches = (range(s, min(s + batch_size, n)) for s in range(start, n, batch_size))
    ex, read = _executor(slide, pool_for(slide, pool), workers)
    with ex:
        queue: deque = deque()

        def submit(idx: range) -> None:
            queue.append(ex.submit(read, [tiles.crops(i) for i in idx], out))

        for idx in batches:
            submit(idx)
            if len(queue) > workers:
                break
        while queue:
            t0 = time.perf_counter()
            batch, read_s = queue.popleft().result()
            wait_s = time.perf_counter() - t0
            idx = next(batches, None)
            if idx is not None:
                submit(idx)
            yield batch, read_s, wait_s
