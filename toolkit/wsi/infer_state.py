"""Resumable slide runs: the predictions ``mclx infer`` has made so far, beside its output.

``mclx infer SLIDE --out p.h5ad`` writes ``p.h5ad.state`` every ``--save-every`` batches
(atomically: a kill at any moment leaves the last complete save), and deletes it when
the predictions are written. ``--resume`` continues from it: the tiles already predicted
are not read again, and the output is the one an uninterrupted run writes, bit for bit,
because saves fall on the run's retrieval blocks (every ``save_every * batch_size``
tiles from the first), so the resumed run batches and matches every tile as the
uninterrupted one does. A state saved for other inputs (slide, tiles, model, bank, k,
distance, backend, batch size) is refused, naming the difference.

The file is an ``.npz`` without pickles::

    format="mclx-infer-state", format_version=1,
    record: JSON of the inputs, done: tiles predicted, preds (done, G) float32
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mclx.errors import FormatError

FORMAT = "mclx-infer-state"
FORMAT_VERSION = 1
SAVE_EVERY = 64  # batches: 4,096 tiles at batch 64, a minute or two of a CPU's work


def tiles_digest(tiles) -> str:
    """sha256 of where the tiles are: their ids, centres and size (and the sides of
    their wider views, when the model reads any)."""
    h = hashlib.sha256("\n".join(tiles.ids).encode())
    h.update(np.ascontiguousarray(tiles.centres, np.float64).tobytes())
    h.update(str(int(tiles.size)).encode())
    if tiles.views:
        h.update(repr(tuple(int(v) for v in tiles.views)).encode())
    return h.hexdigest()[:16]


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """A file (slide, bank) as a resume must find it again: path, bytes and modification
    time (of every file, for a DICOM folder)."""
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    return {
        "path": str(path),
        "bytes": sum(s.st_size for s in stats),
        "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
    }


class InferState:
    """The state file of one slide run.

    Args:
        path: the state file (``mclx.run_state.state_path`` of the output).
        record: the run's inputs; a resume must find the same.
        every: save after every ``every``-th batch (0: never).
    """

    def __init__(self, path: str | os.PathLike, *, every: int = SAVE_EVERY) -> None:
        self.path = Path(path)
        self.every = every
        self.record: dict[str, Any] = {}
        self.saved: tuple[int, np.ndarray] | None = None

    def load(self) -> None:
        """Read the state to resume from (checked against the record in :meth:`start`)."""
        from mclx.artifacts import require_file

        missing = (
            f"{self.path}: no saved run to resume (none was saved: the run finished, had "
            "fewer tiles than one save, used another --out, or its model predicts every "
            "tile at once: a context-radius or section model saves none)"
        )
        path = require_file(self.path, "inference state", missing=missing, nonempty=True)
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["format"]) != FORMAT or int(z["format_version"]) > FORMAT_VERSION:
                    raise ValueError(f"not an {FORMAT} file of version <= {FORMAT_VERSION}")
                record = json.loads(str(z["record"]))
                done, preds = int(z["done"]), np.asarray(z["preds"], np.float32)
        except Exception as exc:  # zip, key, JSON and value errors: all one answer
            from mclx.errors import short

            msg = (
                f"{path}: inference state is unreadable ({short(exc)}); delete it and run "
                "without --resume"
            )
            raise FormatError(msg) from exc
        if preds.shape[0] != done:
            msg = f"{path}: inference state holds {preds.shape[0]} predictions for {done} tiles"
            raise FormatError(msg)
        self.saved = (done, preds)
        self._saved_record = record

    def block(self, batch_size: int, default: int) -> int:
        """Tiles per retrieval block: ``every`` batches when saving, else ``default``
        rounded up to whole batches (so that blocks and saves start at the same tiles)."""
        if self.every:
            return self.every * batch_size
        return -(-default // batch_size) * batch_size

    def start(self, preds: np.ndarray) -> int:
        """Copy the saved predictions into ``preds``; the number of tiles done (0 for a
        fresh run). Refuses a state saved for other inputs."""
        if self.saved is None:
            return 0
        from mclx.run_state import refuse_differences

        refuse_differences(self.path, self._saved_record, self.record, "infer")
        done, saved = self.saved
        if saved.shape[1:] != preds.shape[1:] or done > len(preds):
            msg = f"{self.path}: saved predictions {saved.shape} do not fit this run {preds.shape}"
            raise FormatError(msg)
        preds[:done] = saved
        return done

    def save(self, preds: np.ndarray, done: int) -> None:
        from mclx.files import atomic_path

        with atomic_path(self.path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                format=np.array(FORMAT),
                format_version=np.array(FORMAT_VERSION),
                record=np.array(json.dumps(self.record, sort_keys=True)),
                done=np.array(done),
                preds=preds[:done],
            )

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
