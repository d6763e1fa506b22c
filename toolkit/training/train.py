"""Training: the reference recipe (Adam 1e-4, wd 1e-3, batch 128, 90 epochs, augmentation),
or another model's (:class:`~mclx.config.TrainCfg`: AdamW, cosine decay, flips and 90°
rotations, a validation split that picks the epoch kept).

With ``freeze_encoder`` the image encoder's features are computed once and cached (pooled,
or every token for a model that trains on tokens, CMRCNet), and only the heads and the
spot encoder train: minutes on a 2-core CPU instead of hours.

:func:`fit` can hand a snapshot of its state to a callback after every epoch (weights,
optimizer, every random generator, loss history) and continue from such a snapshot; on
the CPU the continued run gives the same weights, bit for bit, as one never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mclx.config import PreprocessCfg, TrainCfg
from mclx.data.dataset import SpotTable
from mclx.inference.device import torch_device
from mclx.inference.transform import to_tensor
from mclx.training import distributed


def autocast(device: torch.device):
    """bf16 autocast on a GPU (training steps); nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _augment(x: torch.Tensor, kind: str = "mclstexp") -> torch.Tensor:
    """Augmentation drawn per image (uint8 N x 3 x H x W): ``mclstexp`` (ColorJitter
    0.5, 0.5, 0.5, h-flip, rotation up to 180°) or ``dihedral`` (CMRCNet: h-flip and
    v-flip each with p = 0.5, then a rotation by 0, 90, 180 or -90°)."""
    if kind == "dihedral":
        out = []
        for img in x:
            flip = torch.rand(2)
            if flip[0] < 0.5:
                img = img.flip(-1)
            if flip[1] < 0.5:
                img = img.flip(-2)
            out.append(torch.rot90(img, int(torch.randint(4, ())), dims=(-2, -1)))
        return torch.stack(out)
    from torchvision.transforms import v2

    tf = v2.Compose(
        [
            v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(180),
        ]
    )
    return torch.stack([tf(img) for img in x])


def lr_at(cfg: TrainCfg, epoch: int) -> float:
    """The learning rate of ``epoch`` (from 0): ``cfg.lr``, or its cosine decay to
    ``cfg.min_lr`` stepped once before each epoch (the last epoch runs at ``min_lr``),
    or its step decay by ``cfg.lr_gamma`` every ``cfg.lr_step`` epochs."""
    if cfg.min_lr is None:
        return cfg.lr * cfg.lr_gamma ** (epoch // cfg.lr_step) if cfg.lr_step else cfg.lr
    t = min(epoch + 1, cfg.epochs) / cfg.epochs
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t)) / 2


def make_optimizer(params, cfg: TrainCfg) -> torch.optim.Optimizer:
    """Adam (mclSTExp) or AdamW (CMRCNet) at ``cfg.lr`` with ``cfg.weight_decay``."""
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if cfg.optimizer not in kinds:
        msg = f"unknown optimizer {cfg.optimizer!r} ({', '.join(kinds)})"
        raise ValueError(msg)
    return kinds[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def split_rows(table: SpotTable, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows): ``fraction`` of each section's spots, drawn
    with ``seed``, held out (CMRCNet's 80/20 split for ``fraction = 0.2``)."""
    if not 0 <= fraction < 1:
        msg = f"validation fraction {fraction} must be in [0, 1)"
        raise ValueError(msg)
    if not fraction:
        return np.arange(len(table)), np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, 20])
    val = []
    for s in table.sections:
        rows = rng.permutation(table.rows(s))
        val.append(rows[: int(round(len(rows) * fraction))])
    val_rows = np.sort(np.concatenate(val)).astype(np.int64)
    train_rows = np.setdiff1d(np.arange(len(table)), val_rows)
    if len(val_rows) < 2 or len(train_rows) < 2:
        msg = f"validation fraction {fraction} of {len(table)} spots leaves too few on a side"
        raise ValueError(msg)
    return train_rows, val_rows


def batches(
    table: SpotTable,
    cfg: TrainCfg,
    context: str,
    rng: np.random.Generator,
    rows: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """Row indices of each training step of one epoch (over ``rows``, default all).

    ``batch`` context: a shuffled pass over the spots in batches of ``cfg.batch_size``
    (batches of one spot are dropped: a contrastive loss needs two). ``section``
    context: one whole section per step, sections in random order.
    """
    if context == "section":
        for s in rng.permutation(table.sections):
            r = table.rows(s) if rows is None else np.intersect1d(table.rows(s), rows)
            if len(r):
                yield rng.permutation(r)
        return
    perm = rng.permutation(len(table)) if rows is None else rng.permutation(rows)
    for start in range(0, len(perm), cfg.batch_size):
        step = perm[start : start + cfg.batch_size]
        if len(step) > 1:
            yield step


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


def fit(  # long: the loop, its resumable snapshot and the validation choice, in one place
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
    report: dict[str, Any] | None = None,
) -> list[float]:
    """Train ``model`` in place on ``table``; return the mean loss of each epoch.

    Args:
        features: cached encoder features aligned with ``table`` (pooled (N, F), or
            tokens (N, T, F) for a model whose ``feature_kind`` is ``tokens``); required
            when ``cfg.freeze_encoder``.
        start: a snapshot from ``on_epoch`` to continue from (epochs already done are
            skipped; weights, optimizer, random generators and history are restored).
        on_epoch: called after each complete epoch as ``on_epoch(epochs_done, snapshot)``;
            ``snapshot()`` returns ``{"epoch", "history", "model", "optimizer", "rng",
            "best"}`` (model: :func:`trained_state_dict`), tensors shared with the live
            model.
        report: filled with ``val_history`` and ``best_epoch`` when ``cfg.val_fraction``
            holds spots out (the weights kept are those of the best epoch).
    """
    from tqdm.auto import tqdm

    device = device or torch_device()
    steps = _Steps(model.to(device), table, cfg, pre, features, device)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    rng = np.random.default_rng(cfg.seed)
    train_rows, val_rows = split_rows(table, cfg.val_fraction, cfg.seed)
    history: list[float] = []
    best: dict[str, Any] = {"epoch": 0, "loss": math.inf, "model": None, "val_history": []}
    if start is not None:
        _restore(model, opt, start, cfg, rng)
        history = [float(x) for x in start["history"]]
        best = dict(start.get("best") or best)

    def snapshot() -> dict[str, Any]:
        return {
            "epoch": len(history),
            "history": list(history),
            "model": trained_state_dict(model, cfg),
            "optimizer": opt.state_dict(),
            "rng": capture_rng(rng),
            "best": best if len(val_rows) else None,
        }

    done = len(history)
    # `with` closes the bar before an interrupt's error line is printed
    with tqdm(
        total=cfg.epochs, initial=done, desc="train", unit="epoch", disable=not progress
    ) as bar:
        for epoch in range(done, cfg.epochs):
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, epoch)
            history.append(steps.epoch(opt, rng, None if not len(val_rows) else train_rows))
            if len(val_rows):
                best = _keep_best(best, epoch + 1, steps.evaluate(val_rows), model, cfg)
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if on_epoch is not None:
                on_epoch(epoch + 1, snapshot)
    if len(val_rows) and best["model"] is not None:
        model.load_state_dict(best["model"], strict=False)
    if report is not None and len(val_rows):
        report.update(val_history=list(best["val_history"]), best_epoch=int(best["epoch"]))
    model.eval()
    return history


def _keep_best(best: dict[str, Any], epoch: int, loss: float, model, cfg) -> dict[str, Any]:
    """The validation record after ``epoch``: its loss appended, and the weights kept
    when the loss is the lowest so far (a copy: training changes the live tensors)."""
    out = {**best, "val_history": [*best["val_history"], loss]}
    if loss < best["loss"]:
        weights = {k: v.clone() for k, v in trained_state_dict(model, cfg).items()}
        out.update(epoch=epoch, loss=loss, model=weights)
    return out


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
        if cfg.feature_views != 1 and not frozen:
            msg = "feature views are cached features of a frozen encoder (--freeze-encoder)"
            raise ValueError(msg)
        for p in model.image_encoder.parameters():
            p.requires_grad_(not frozen)
        self.model, self.table, self.cfg, self.pre, self.device = model, table, cfg, pre, device
        self.world = distributed.world()  # several processes: global batches split, DDP
        self.global_loss = distributed.wrap(model, self.world) if self.world else None
        self.expr = torch.as_tensor(table.expr, device=device)
        self.pos = torch.as_tensor(table.pos, device=device)
        self.feats = torch.as_tensor(features, device=device) if frozen else None
        self.views = cfg.feature_views if frozen else 1
        self.counts = _counts(model, table, device, self.world)

    def features(self, rows: np.ndarray, r: torch.Tensor, *, augment: bool = True):
        if self.feats is not None and self.views > 1:  # (N, views, F): one view per spot
            view = torch.randint(self.views, (len(r),)).to(self.device) if augment else 0
            return self.feats[r, view]
        if self.feats is not None:
            return self.feats[r]
        x = torch.as_tensor(self.table.patches[rows]).permute(0, 3, 1, 2)
        if augment and self.cfg.augment:
            x = _augment(x, self.cfg.augmentation)
        x = to_tensor(x.permute(0, 2, 3, 1), self.pre, self.device)
        return image_features(self.model, x)

    def extra(self, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The loss's arguments after the positions: the raw counts for a model that
        reads them (``reads_counts``: His2ST's ZINB term), else none."""
        return () if self.counts is None else (self.counts[r],)

    def epoch(self, opt, rng: np.random.Generator, rows: np.ndarray | None = None) -> float:
        """One pass over the data (``rows``, default all); the mean loss of its steps."""
        model = self.model
        model.train()
        if self.feats is not None:
            model.image_encoder.eval()
        losses = []
        for rows_ in batches(self.table, self.cfg, model.cfg.context, rng, rows):
            n = len(rows_)
            if self.world is not None:
                rows_ = distributed.shard(rows_, self.world)
            r = torch.as_tensor(rows_, device=self.device)
            with autocast(self.device):
                feats = self.features(rows_, r).float()
                if self.global_loss is not None:
                    loss = self.global_loss(feats, self.expr[r], self.pos[r], n)
                else:
                    loss = model.loss(feats, self.expr[r], self.pos[r], *self.extra(r))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        mean = float(np.mean(losses)) if losses else float("nan")
        return distributed.mean(mean) if self.world is not None else mean

    @torch.no_grad()
    def evaluate(self, rows: np.ndarray) -> float:
        """The model's mean loss (eval mode, no augmentation) over ``rows`` in order, in
        training-sized batches (a section's rows at once in ``section`` context)."""
        self.model.eval()
        if self.model.cfg.context == "section":
            parts = [np.intersect1d(self.table.rows(s), rows) for s in self.table.sections]
        else:
            parts = [
                rows[i : i + self.cfg.batch_size] for i in range(0, len(rows), self.cfg.batch_size)
            ]
        losses = []
        for rows_ in (p for p in parts if len(p) > 1):
            r = torch.as_tensor(rows_, device=self.device)
            with autocast(self.device):
                feats = self.features(rows_, r, augment=False).float()
                loss = self.model.loss(feats, self.expr[r], self.pos[r], *self.extra(r))
                losses.append(float(loss))
        return float(np.mean(losses)) if losses else float("nan")


def _counts(model: nn.Module, table: SpotTable, device, world) -> torch.Tensor | None:
    """The table's raw counts on ``device`` when ``model`` reads them, else None."""
    if not getattr(model, "reads_counts", False):
        return None
    if world is not None:
        msg = f"{model.cfg.name}: its loss reads whole sections' counts; train it in one process"
        raise ValueError(msg)
    if table.counts is None:
        msg = f"{model.cfg.name}: its loss reads raw counts, which this table does not hold"
        raise ValueError(msg)
    return torch.as_tensor(table.counts, device=device)


def image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What ``model.loss`` reads of an image batch: pooled encoder features, or the
    model's own (``image_features``: CMRCNet's tokens)."""
    own = getattr(model, "image_features", None)
    return own(images) if own is not None else model.image_encoder(images)
