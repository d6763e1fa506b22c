"""Any timm model as the image encoder: ``--encoder timm:NAME --encoder-weights FILE``.

The model comes from ``timm.create_model(NAME, pretrained=True,
pretrained_cfg_overlay=dict(file=FILE), num_classes=0)``: weights from the local file
only (nothing is downloaded), no classifier, so that its ``forward`` gives the pooled
features its model card defines (a ViT's class token or token mean, a CNN's average
pool: timm's ``global_pool``). Its input size and normalisation come from timm's
pretrained config of ``NAME`` (:func:`timm_preprocess`) and are stored in the
checkpoint's preprocessing, which export and inference read. timm is an optional extra
(``pip install 'mclx[timm]'``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

PREFIX = "timm:"


def is_timm(name: str) -> bool:
    return str(name).startswith(PREFIX)


def _timm(name: str):
    from mclx.extras import require

    return require("timm", message=f"--encoder {name} needs timm: pip install 'mclx[timm]'")


def _arch(name: str) -> str:
    arch = name[len(PREFIX) :]
    if not arch:
        msg = f"--encoder {name!r}: give a timm model name after 'timm:' (timm:resnet50)"
        raise ValueError(msg)
    return arch


class TimmEncoder(nn.Module):
    """A timm model without classifier, answering mclx's encoder questions."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_features = int(model.num_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (N, T, F): a ViT's tokens as they are, a feature map's positions."""
        f = self.forward_features(x)
        return f.flatten(2).transpose(1, 2) if f.ndim == 4 else f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, F), pooled as the model's own head pools."""
        return self.model(x)


def create_timm_encoder(name: str, *, weights: str | os.PathLike | None = None) -> TimmEncoder:
    """``timm:NAME`` with ``weights``: a file (timm's ``pretrained_cfg_overlay``), or
    None / ``"auto"`` for random initialisation (with a warning for ``auto``: no file)."""
    timm, arch = _timm(name), _arch(name)
    kwargs: dict[str, Any] = {"num_classes": 0}
    if weights is not None and str(weights) not in ("auto", "none"):
        path = Path(weights)
        if str(weights) == "imagenet" or not path.is_file():
            msg = f"{weights}: --encoder {name} loads weights from a local file only; no such file"
            raise FileNotFoundError(msg)
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    elif weights == "auto":
        warnings.warn(
            f"{name}: no --encoder-weights file; using random initialisation", stacklevel=2
        )
    try:
        model = timm.create_model(arch, **kwargs)
    except RuntimeError as exc:  # a file whose tensors do not fit the architecture
        detail = " ".join(str(exc).split())[:160]
        msg = f"{weights}: weights do not fit timm model {arch} ({detail})"
        raise ValueError(msg) from exc
    except Exception as exc:  # unknown name, unreadable file
        if "Unknown model" in str(exc):
            msg = f"unknown timm model {arch!r} (timm.list_models() lists them)"
            raise KeyError(msg) from None
        if "pretrained" in kwargs:
            msg = f"{weights}: cannot load timm weights ({exc.__class__.__name__}: {exc})"
            raise ValueError(msg) from exc
        raise
    return TimmEncoder(model)


def timm_preprocess(name: str) -> dict[str, Any]:
    """PreprocessCfg fields of ``timm:NAME``: ``patch_size`` (its input side), ``mean``
    and ``std`` from timm's pretrained config of NAME."""
    timm, arch = _timm(name), _arch(name)
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # a name without pretrained config: read the built model's
        cfg = None
    if cfg is None:
        cfg = timm.create_model(arch, pretrained=False, num_classes=0).pretrained_cfg
    cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    if size[-1] != size[-2]:
        msg = f"timm model {arch}: input {size[-2]} x {size[-1]} px is not square"
        raise ValueError(msg)
    return {
        "patch_size": int(size[-1]),
        "mean": tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
    }
