"""Training: the reference recipe (Adam 1e-4, wd 1e-3, batch 128, 90 epochs, augmentation).

With ``freeze_encoder`` the image encoder's pooled features are computed once and cached,
and only the heads and the spot encoder train: minutes on a 2-core CPU instead of hours.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from mclx.config import PreprocessCfg, TrainCfg
from mclx.data.dataset import SpotTable


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_input(patches: np.ndarray | torch.Tensor, pre: PreprocessCfg, device) -> torch.Tensor:
    """uint8 NHWC patches -> float NCHW in the model's pixel scale (``[0, 1]``, mean/std)."""
    x = torch.as_tensor(patches).to(device)
    if x.dtype == torch.uint8 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255.0
    if any(pre.mean) or any(s != 1 for s in pre.std):
        mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def encode_features(
    encoder: nn.Module,
    patches: np.ndarray,
    pre: PreprocessCfg,
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Pooled encoder features (N, F) float32 of uint8 patches, in eval mode."""
    from tqdm.auto import tqdm

    device = device or default_device()
    encoder = encoder.to(device).eval().to(memory_format=torch.channels_last)
    out = []
    for start in tqdm(
        range(0, len(patches), batch_size), desc="encode", unit="batch", disable=not progress
    ):
        with _autocast(device):
            f = encoder(to_input(patches[start : start + batch_size], pre, device))
        out.append(f.float().cpu().numpy())
    dim = getattr(encoder, "num_features", 0)
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


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


def fit(
    model: nn.Module,
    table: SpotTable,
    cfg: TrainCfg,
    pre: PreprocessCfg,
    *,
    features: np.ndarray | None = None,
    device: torch.device | None = None,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place on ``table``; return the mean loss of each epoch.

    Args:
        features: cached pooled encoder features (N, F) aligned with ``table``; required
            when ``cfg.freeze_encoder``.
    """
    from tqdm.auto import tqdm

    device = device or default_device()
    frozen = cfg.freeze_encoder
    if frozen and features is None:
        msg = "freeze_encoder needs cached encoder features"
        raise ValueError(msg)
    if not frozen and table.patches is None:
        msg = "training the image encoder needs patches"
        raise ValueError(msg)
    model.to(device)
    for p in model.image_encoder.parameters():
        p.requires_grad_(not frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    rng = np.random.default_rng(cfg.seed)
    expr = torch.as_tensor(table.expr, device=device)
    pos = torch.as_tensor(table.pos, device=device)
    feats = torch.as_tensor(features, device=device) if frozen else None
    context = getattr(model.cfg, "context", "batch")
    history: list[float] = []
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not progress)
    for _ in bar:
        model.train()
        if frozen:
            model.image_encoder.eval()
        losses = []
        for rows in batches(table, cfg, context, rng):
            r = torch.as_tensor(rows, device=device)
            with _autocast(device):
                if frozen:
                    f = feats[r]
                else:
                    x = torch.as_tensor(table.patches[rows]).permute(0, 3, 1, 2)
                    if cfg.augment:
                        x = _augment(x)
                    f = model.image_encoder(to_input(x.permute(0, 2, 3, 1), pre, device))
                loss = model.loss(f.float(), expr[r], pos[r])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)) if losses else float("nan"))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return history


@torch.inference_mode()
def spot_embeddings(
    model: nn.Module, table: SpotTable, *, seq_len: int = 128, device=None
) -> np.ndarray:
    """Spot embeddings (N, D) float32, each section encoded on its own.

    In ``batch`` context the attention sees consecutive runs of ``seq_len`` spots of a
    section (the training batch size); in ``section`` context the whole section.
    """
    device = device or default_device()
    model.to(device).eval()
    out = np.zeros((len(table), model.cfg.embed_dim), np.float32)
    for s in table.sections:
        rows = table.rows(s)
        step = len(rows) if model.cfg.context == "section" else seq_len
        for start in range(0, len(rows), step):
            r = rows[start : start + step]
            e = model.embed_spots(
                torch.as_tensor(table.expr[r], device=device),
                torch.as_tensor(table.pos[r], device=device),
            )
            out[r] = e.float().cpu().numpy()
    return out


@torch.inference_mode()
def image_outputs(model: nn.Module, features: np.ndarray, *, device=None) -> np.ndarray:
    """Model head on pooled features: embeddings (contrastive) or expression (ST-Net)."""
    device = device or default_device()
    model.to(device).eval()
    f = torch.as_tensor(features, device=device)
    return model.embed_image_features(f).float().cpu().numpy()
