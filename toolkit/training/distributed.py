"""Data-parallel training: torch DistributedDataParallel with global negatives.

``mclx train --nproc N`` starts N copies of the same command (:func:`launch`), as
``torchrun --nproc_per_node N -m mclx train ...`` does; each joins the process group from
the environment (:func:`from_env`: NCCL on GPUs, one per process, gloo on CPU).

Every global batch of the single-process order (``--batch-size`` is the global batch)
is split between the processes (:func:`shard`), so N processes see the batches one
process would. The contrastive loss then uses *global negatives*: image embeddings are
all-gathered with their gradients (``torch.distributed.nn.functional.all_gather``) and
every process scores all spots against all images, so 2 processes x 64 give the loss and
the gradients of 1 process x 128. The spot side is cheap: its inputs are gathered and
each process runs the spot encoder over the whole global sequence, which keeps the
spot Transformer's attention context the global batch, as with one process. DDP then
averages the gradients: the image side's are the sum over processes of each one's share
(the all-gather's backward is a reduce-scatter), the spot side's are equal on every
process. Dropout draws its own masks per process, and batch norm, when the encoder is
fine-tuned on CPU, normalises over each process's share (SyncBatchNorm on GPUs).

We split the single-process order rather than use ``torch.utils.data.DistributedSampler``,
which draws its own order and pads or drops per process: with it, ``--nproc 2`` would
train on other batches than ``--nproc 1`` and a duplicated spot would be its own negative.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place in the process group."""

    rank: int
    size: int
    local_rank: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0


_WORLD: World | None = None
_GATHERS = None  # the embeddings' all-gathers: a process group of their own, not DDP's


def world() -> World | None:
    """The process group this process joined (None: a single process)."""
    return _WORLD


def from_env() -> World | None:
    """Join the process group that ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (and
    ``MASTER_ADDR``/``MASTER_PORT``) describe, as torchrun and :func:`launch` set them;
    None when there is one process."""
    global _WORLD, _GATHERS
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if _WORLD is not None or size <= 1:
        return _WORLD
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=size)
    _GATHERS = dist.new_group(backend=backend)
    _WORLD = World(rank, size, local, backend)
    return _WORLD


def shutdown() -> None:
    global _WORLD, _GATHERS
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = _GATHERS = None


def shard(rows: np.ndarray, w: World) -> np.ndarray:
    """This process's share of a global batch: contiguous, sizes differing by one at most."""
    return np.array_split(rows, w.size)[w.rank]


def _sizes(n: int, device) -> list[int]:
    import torch.distributed as dist

    local = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local, group=_GATHERS)
    return [int(s) for s in sizes]


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    if len(x) == n:
        return x.contiguous()
    return torch.cat([x, x.new_zeros((n - len(x), *x.shape[1:]))])


def gather(x: torch.Tensor, *, grad: bool = True, sizes: list[int] | None = None) -> torch.Tensor:
    """``x`` of every process concatenated in rank order (shares may differ in length:
    ``sizes``, asked for when not given); with ``grad`` through the autograd-aware
    all-gather, whose backward sends each process the gradient of its share summed over
    the processes."""
    import torch.distributed as dist

    sizes = sizes or _sizes(len(x), x.device)
    padded = _pad(x, max(sizes))
    if grad:
        import warnings

        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # "deprecated" for a private successor; still exact
            warnings.simplefilter("ignore", FutureWarning)
            parts = all_gather(padded, group=_GATHERS or dist.group.WORLD)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=_GATHERS)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def mean(value: float) -> float:
    """The mean of ``value`` over the processes."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if _WORLD is not None and _WORLD.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


class GlobalLoss(nn.Module):
    """A model's loss over the global batch, from this process's share of it.

    mclSTExp and BLEEP: the image embeddings of all processes (gathered with gradients)
    against the spot embeddings of the whole global sequence. Other models: the share's
    loss scaled by its part of the global batch, so that DDP's average of the processes'
    gradients is the global mean's for a mean over spots (ST-Net); a contrastive model of
    another structure (CMRCNet) sees its own share's negatives.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats, expr, pos, n_global: int) -> torch.Tensor:
        m = self.model
        if not all(hasattr(m, a) for a in ("embed_image_features", "embed_spots", "loss_fn")):
            size = torch.distributed.get_world_size()
            return m.loss(feats, expr, pos) * (len(feats) * size / n_global)
        sizes = _sizes(len(feats), feats.device)
        img = gather(m.embed_image_features(feats), sizes=sizes)
        spots = gather(torch.cat([expr, pos.to(expr.dtype)], 1), grad=False, sizes=sizes)
        g = expr.shape[1]  # positions are small integers: exact in the expression's dtype
        spot = m.embed_spots(spots[:, :g], spots[:, g:].to(pos.dtype))
        return m.loss_fn(spot, img, m.cfg.temperature)


def wrap(model: nn.Module, w: World) -> nn.Module:
    """``model``'s :class:`GlobalLoss` in DistributedDataParallel (batch norm synchronised
    on GPUs)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if w.backend == "nccl":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DDP(GlobalLoss(model), device_ids=[w.local_rank])
    return DDP(GlobalLoss(model))


def same_weights(model: nn.Module) -> list[str]:
    """The fingerprint of ``model``'s weights on every process (rank order)."""
    import torch.distributed as dist

    from mclx.checkpoint import fingerprint

    prints: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(prints, fingerprint(model.state_dict()))
    return [str(p) for p in prints]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``python -m mclx ARGV`` in ``nproc`` processes on this machine (one process
    group); their exit status (the first failure's). Rank 0 prints; the others' error
    line is shown only when rank 0 has none."""
    env = {**os.environ, "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}  # fmt: skip
    procs, logs = [], []
    for rank in range(nproc):
        log = tempfile.TemporaryFile(mode="w+") if rank else None
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mclx", *argv],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.DEVNULL if rank else None, stderr=log,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        ))  # fmt: skip
    try:
        rc = _wait(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if rc and procs[0].returncode in (0, None, -9):
        for log in logs[1:]:
            log.seek(0)
            lines = [ln for ln in log.read().splitlines() if ln.startswith("mclx: error:")]
            if lines:
                print(lines[-1], file=sys.stderr)
                break
    for log in logs[1:]:
        log.close()
    return rc


def _die_with_parent() -> None:
    """In a launched process (Linux): be killed when the launcher dies, even by SIGKILL,
    rather than wait forever for a process group that lost its launcher."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _wait(procs: list[subprocess.Popen]) -> int:
    """Wait for all; at the first failure stop the others (they would wait forever for it)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)
