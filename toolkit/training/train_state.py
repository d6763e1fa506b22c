"""Resumable training: the state file ``mclx train`` keeps beside its checkpoint.

``mclx train --out model.pt`` writes ``model.pt.state`` after complete epochs, atomically
(temporary file, fsync, rename), so a kill at any moment leaves the state of the last
saved epoch intact: after every epoch, unless epochs are so short that saving each would
take over 5% of the time, then every few (``--save-every N``: every N-th). ``--resume``
continues from it; the finished checkpoint is the one an uninterrupted run writes (same
weights, bit for bit, on the CPU). On success the state file is deleted.

A state holds the trained weights and their two Adam moments: 76 MB for mclSTExp over
785 genes with a frozen encoder. Training pauses to copy them (0.01-0.03 s) and a thread
writes the copy during the next epoch; on 2 CPU cores that still slows a 0.7 s frozen
epoch over her2st's 918 image spots by 0.1 s (the writing competes for the cores), so
there the default saves every few epochs (about every 2-3 s). Epochs that fine-tune the
encoder take minutes, and each is saved. An interrupted run waits for a write in
progress; a killed one may leave its temporary file, which the next run deletes.

The file is a dict loadable with ``torch.load(weights_only=True)``::

    {"format": "mclx-train-state", "format_version": 1,
     "epoch": complete epochs, "history": mean loss of each,
     "model": state_dict (without the image encoder when it is frozen: its weights
              never change, and the record's encoder fingerprint checks them on resume),
     "optimizer": Adam state_dict,
     "rng": torch / CUDA / numpy / Python / data-order generator states,
     "record": what the run trains on (sections, data digest, preprocessing, model and
               training configs without ``epochs``, encoder weights, seed),
     "resumed_at": epochs at which earlier resumes started}

Resuming with different arguments is refused; only ``--epochs`` may change (it must not
be below the epochs already done), so a run can also be extended.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mclx.artifacts import read_torch_artifact, require_keys
from mclx.files import atomic_path
from mclx.run_state import refuse_differences

FORMAT = "mclx-train-state"
FORMAT_VERSION = 1
SAVE_BUDGET = 0.05  # default policy: saving may take up to 5% of the training time
_KEYS = ("epoch", "history", "model", "optimizer", "rng", "record")


def data_digest(table: Any) -> str:
    """sha256 of the training spots: ids, positions, expression and a pixel subsample."""
    h = hashlib.sha256()
    h.update("\n".join(map(str, table.obs_names)).encode())
    for arr in (table.pos, table.expr):
        h.update(np.ascontiguousarray(arr).tobytes())
    if table.patches is not None:
        h.update(np.ascontiguousarray(table.patches[:, ::8, ::8]).tobytes())
    return h.hexdigest()[:16]


def _host_copy(obj: Any) -> Any:
    """``obj`` with every tensor copied to host memory (training may change the originals)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Hold Ctrl-C back for the block (main thread): a SIGINT that comes meanwhile is
    recorded by a stand-in handler and handed to the real one right after the block.

    ``Thread.start`` interrupted between starting the thread and seeing it run leaves a
    thread that cannot be joined yet ("cannot join thread before it is started"), whose
    save would be abandoned. A handler, not a signal mask: the kernel delivers a
    process-directed SIGINT to any thread that does not block it (torch's, Ray's, the
    readers'), while Python runs its handlers in the main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if came and callable(old):
        old(signal.SIGINT, None)  # Python's own handler: KeyboardInterrupt, here
    elif came and old == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)  # what the signal would have done


class StateFile:
    """The state file of one training run: load, check, save each epoch, remove.

    Args:
        path: the state file (:func:`state_path` of the checkpoint).
        every: save after every ``every``-th epoch (0: never); None: after every epoch
            while that keeps saving under ``SAVE_BUDGET`` of the time, else less often.
        background: write from a thread while training goes on (see :meth:`on_epoch`).
    """

    def __init__(
        self, path: str | os.PathLike, *, every: int | None = None, background: bool = True
    ) -> None:
        self.path = Path(path)
        self.every = every
        self.background = background
        self._clock = time.monotonic
        self._last: tuple[float, float] | None = None  # (began, seconds) of the last save
        self.record: dict[str, Any] = {}
        self.resume_from: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def load(self) -> dict[str, Any]:
        """Read and validate the state to resume from (kept as ``resume_from``)."""
        path = self.path
        payload = read_torch_artifact(
            path,
            "training state",
            expected=FORMAT,
            supported=FORMAT_VERSION,
            heading="training state is unreadable",
            missing=(
                f"{path}: no training state to resume (none was saved: the run finished, "
                "never completed an epoch, or used another --out)"
            ),
            hint="; delete it and train without --resume",
        )
        require_keys(path, "training state", payload, _KEYS)
        self.resume_from = payload
        return payload

    def start(self, epochs: int) -> dict[str, Any] | None:
        """The state to continue from, after checking it matches ``record`` and ``epochs``.

        Returns None for a fresh run.
        """
        if self.resume_from is None:
            return None
        refuse_differences(self.path, self.resume_from["record"], self.record, "train")
        done = int(self.resume_from["epoch"])
        if done > epochs:
            msg = f"{self.path}: {done} epochs are already done, more than --epochs {epochs}"
            raise ValueError(msg)
        return self.resume_from

    @property
    def resumed_at(self) -> list[int]:
        if self.resume_from is None:
            return []
        return [*self.resume_from.get("resumed_at", []), int(self.resume_from["epoch"])]

    def due(self, epoch: int, total: int) -> bool:
        """Whether to save after ``epoch``: never after the last (the checkpoint follows);
        with ``every=None`` after the first, then once the time since the last save
        began is ``1 / SAVE_BUDGET`` times what that save took."""
        if epoch >= total or self.every == 0:
            return False
        if self.every is not None:
            return epoch % self.every == 0
        if self._thread is not None and self._thread.is_alive():
            return False
        if self._last is None:
            return True
        began, took = self._last
        return self._clock() - began >= took / SAVE_BUDGET

    def on_epoch(self, epoch: int, total: int, snapshot) -> None:
        """Save the state after ``epoch`` when :meth:`due`.

        With ``background`` the tensors are copied to host memory (0.01-0.03 s for
        76 MB on 2 CPU cores) and a thread writes them while the next epoch runs.
        """
        if not self.due(epoch, total):
            return
        began = self._clock()
        snap = snapshot()
        self.wait()  # one save at a time
        if not self.background:
            self._save_timed(snap, began)
            return
        snap = _host_copy(snap)
        thread = threading.Thread(target=self._save_in_thread, args=(snap, began))
        with _ctrl_c_deferred():  # a Ctrl-C inside start() could leave it half started
            thread.start()
            self._thread = thread

    def _save_timed(self, snap: Mapping[str, Any], began: float) -> None:
        try:
            self.save(snap)
        finally:
            self._last = (began, self._clock() - began)

    def _save_in_thread(self, snap: Mapping[str, Any], began: float) -> None:
        try:
            self._save_timed(snap, began)
        except BaseException as exc:  # reported by wait()
            self._error = exc

    def wait(self, *, quiet: bool = False) -> None:
        """Wait for a save in progress; raise its error unless ``quiet``."""
        if self._thread is not None:
            self._thread.join()  # cleared only once joined: a Ctrl-C here waits again
            self._thread = None
        error, self._error = self._error, None
        if error is not None and not quiet:
            raise error

    def save(self, snap: Mapping[str, Any]) -> None:
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **snap,
            "record": self.record,
            "resumed_at": self.resumed_at,
        }
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)

    def remove(self) -> None:
        """Delete the state file (the run finished and its checkpoint is written)."""
        self.wait(quiet=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
