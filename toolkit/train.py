"""Training: the reference recipe (Adam 1e-4, wd 1e-3, batch 128, 90 epochs, augmentation).

With ``freeze_encoder`` the image encoder's pooled features are computed once and cached,
and only the heads and the spot encoder train: minutes on a 2-core CPU instead of hours.

:func:`fit` can hand a snapshot of its state to a callback after every epoch (weights,
optimizer, every random generator, loss history) and continue from such a snapshot; on
the CPU the continued run gives the same weights, bit for bit, as one never stopped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mclx import distributed
from mclx.config import PreprocessCfg, TrainCfg
from mclx.data.dataset import SpotTable
from mclx.inference.device import torch_device
from mclx.inference.embed import autocast
from mclx.inference.transform import to_tensor


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Reference augmentation, drawn per image: ColorJitter(.5,.5,.5), h-flip, rotation."""
    from torchvision.transforms import v2

    tf = v2.Compose(
        [
            v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(180),
        ]
    )
    return torch.stack([tf(img) for img in x])


def batches(
    table: SpotTable, cfg: TrainCfg, context: str, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Row indices of each training step of one epoch.

    ``batch`` context: a shuffled pass over all spots in batches of ``cfg.batch_size``
    (batches of one spot are dropped: a contrastive loss needs two). ``section``
    context: one whole section per step, sections in random order.
    """
    if context == "section":
        for s in rng.permutation(table.sections):
            yield rng.permutation(table.rows(s))
        return
    perm = rng.permutation(len(table))
    for start in range(0, len(perm), cfg.batch_size):
        rows = perm[start : start + cfg.batch_size]
        if len(rows) > 1:
            yield rows


def capture_rng(data_rng: np.random.Generator) -> dict[str, Any]:
    """Every random generator training draws from, as ``weights_only``-loadable values.

    torch (CPU and CUDA) as byte tensors; numpy's global state, Python's ``random`` and
    the data-order generator as JSON strings (their integers exceed 64 bits).
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": json.dumps([kind, keys.tolist(), pos, has_gauss, gauss]),
        "python": json.dumps([version, list(mt), gauss_next]),
        "data": json.dumps(data_rng.bit_generator.state),
    }


def restore_rng(state: Mapping[str, Any], data_rng: np.random.Generator) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = json.loads(state["numpy"])
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, gauss))
    version, mt, gauss_next = json.loads(state["python"])
    random.setstate((version, tuple(mt), gauss_next))
    data_rng.bit_generator.state = json.loads(state["data"])


def trained_state_dict(model: nn.Module, cfg: TrainCfg) -> dict[str, torch.Tensor]:
    """The weights training changes: all of them, or all but a frozen image encoder's."""
    sd = model.state_dict()
    if cfg.freeze_encoder:
        sd = {k: v for k, v in sd.items() if not k.startswith("image_encoder.")}
    return {k: v.detach() for k, v in sd.items()}


class StateMismatch(ValueError):
    """A snapshot given to :func:`fit` as ``start`` does not fit the model or optimizer."""


def _restore(model, opt, start: Mapping[str, Any], cfg: TrainCfg, data_rng) -> None:
    try:
        missing, unexpected = model.load_state_dict(dict(start["model"]), strict=False)
        frozen = cfg.freeze_encoder
        missing = [k for k in missing if not (frozen and k.startswith("image_encoder."))]
        if missing or unexpected:
            msg = f"weights do not fit the model (missing {missing[:2]}, extra {unexpected[:2]})"
            raise StateMismatch(msg)
        opt.load_state_dict(start["optimizer"])
        restore_rng(start["rng"], data_rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, StateMismatch):
            raise
        detail = " ".join(str(exc).split())[:120]
        msg = f"state does not fit the model ({exc.__class__.__name__}: {detail})"
        raise StateMismatch(msg) from exc


EpochHook = Callable[[int, Callable[[], dict[str, Any]]], None]


def fit(
    model: nn.Module,
    table: SpotTable,
    cfg: TrainCfg,
    pre: PreprocessCfg,
    *,
    features: np.ndarray | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    start: Mapping[str, Any] | None = None,
    on_epoch: EpochHook | None = None,
) -> list[float]:
    """Train ``model`` in place on ``table``; return the mean loss of each epoch.

    Args:
        features: cached pooled encoder features (N, F) aligned with ``table``; required
            when ``cfg.freeze_encoder``.
        start: a snapshot from ``on_epoch`` to continue from (epochs already done are
            skipped; weights, optimizer, random generators and history are restored).
        on_epoch: called after each complete epoch as ``on_epoch(epochs_done, snapshot)``;
            ``snapshot()`` returns ``{"epoch", "history", "model", "optimizer", "rng"}``
            (model: :func:`trained_state_dict`), tensors shared with the live model.
    """
    from tqdm.auto import tqdm

    device = device or torch_device()
    steps = _Steps(model.to(device), table, cfg, pre, features, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    rng = np.random.default_rng(cfg.seed)
    history: list[float] = []
    if start is not None:
        _restore(model, opt, start, cfg, rng)
        history = [float(x) for x in start["history"]]

    def snapshot() -> dict[str, Any]:
        return {
            "epoch": len(history),
            "history": list(history),
            "model": trained_state_dict(model, cfg),
            "optimizer": opt.state_dict(),
            "rng": capture_rng(rng),
        }

    done = len(history)
    # `with` closes the bar before an interrupt's error line is printed
    with tqdm(
        total=cfg.epochs, initial=done, desc="train", unit="epoch", disable=not progress
    ) as bar:
        for epoch in range(done, cfg.epochs):
            history.append(steps.epoch(opt, rng))
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if on_epoch is not None:
                on_epoch(epoch + 1, snapshot)
    model.eval()
    return history


class _Steps:
    """The optimisation steps of one epoch: batches of cached features (frozen encoder)
    or of augmented patches through the encoder, into the model's loss."""

    def __init__(self, model, table: SpotTable, cfg: TrainCfg, pre, features, device) -> None:
        frozen = cfg.freeze_encoder
        if frozen and features is None:
            msg = "freeze_encoder needs cached encoder features"
            raise ValueError(msg)
        if not frozen and table.patches is None:
            msg = "training the image encoder needs patches"
            raise ValueError(msg)
        for p in model.image_encoder.parameters():
            p.requires_grad_(not frozen)
        self.model, self.table, self.cfg, self.pre, self.device = model, table, cfg, pre, device
        self.world = distributed.world()  # several processes: global batches split, DDP
        self.global_loss = distributed.wrap(model, self.world) if self.world else None
        self.expr = torch.as_tensor(table.expr, device=device)
        self.pos = torch.as_tensor(table.pos, device=device)
        self.feats = torch.as_tensor(features, device=device) if frozen else None

    def features(self, rows: np.ndarray, r: torch.Tensor) -> torch.Tensor:
        if self.feats is not None:
            return self.feats[r]
        x = torch.as_tensor(self.table.patches[rows]).permute(0, 3, 1, 2)
        if self.cfg.augment:
            x = _augment(x)
        return self.model.image_encoder(to_tensor(x.permute(0, 2, 3, 1), self.pre, self.device))

    def epoch(self, opt, rng: np.random.Generator) -> float:
        """One pass over the data; the mean loss of its steps."""
        model = self.model
        model.train()
        if self.feats is not None:
            model.image_encoder.eval()
        losses = []
        for rows in batches(self.table, self.cfg, model.cfg.context, rng):
            n = len(rows)
            if self.world is not None:
                rows = distributed.shard(rows, self.world)
            r = torch.as_tensor(rows, device=self.device)
            with autocast(self.device):
                feats = self.features(rows, r).float()
                if self.global_loss is not None:
                    loss = self.global_loss(feats, self.expr[r], self.pos[r], n)
                else:
                    loss = model.loss(feats, self.expr[r], self.pos[r])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        mean = float(np.mean(losses)) if losses else float("nan")
        return distributed.mean(mean) if self.world is not None else mean
