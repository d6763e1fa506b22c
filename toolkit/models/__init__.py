"""Model registry: ``create_model(cfg)`` builds any registered method from its config.

Registered models: ``mclstexp`` (the paper), ``bleep`` and ``stnet`` (comparison methods).
Registered image encoders: see :data:`ENCODERS` (``densenet121`` by default).
"""

from __future__ import annotations

import os

from torch import nn

from mclx.config import ModelCfg
from mclx.models.bleep import bleep_loss
from mclx.models.encoders import ENCODERS, ImageEncoder, create_encoder
from mclx.models.layers import ProjectionHead, TransformerBlock
from mclx.models.mclstexp import MclSTExp, SpotEncoder, clip_loss
from mclx.models.registry import Registry
from mclx.models.stnet import STNet

MODELS = Registry("model")


@MODELS.register
def mclstexp(cfg: ModelCfg, encoder: ImageEncoder) -> MclSTExp:
    return MclSTExp(cfg, encoder, clip_loss)


@MODELS.register
def bleep(cfg: ModelCfg, encoder: ImageEncoder) -> MclSTExp:
    return MclSTExp(cfg, encoder, bleep_loss)


@MODELS.register
def stnet(cfg: ModelCfg, encoder: ImageEncoder) -> STNet:
    return STNet(cfg, encoder)


def create_model(cfg: ModelCfg, *, encoder_weights: str | os.PathLike | None = None) -> nn.Module:
    """Build ``cfg.name`` with a ``cfg.encoder`` image encoder.

    Args:
        cfg: model configuration.
        encoder_weights: ``"auto"`` (torchvision cache if present, else random init with a
            warning), ``"imagenet"``, a weights file, or None (random init, e.g. before
            loading a checkpoint).
    """
    builder = MODELS.get(cfg.name)
    return builder(cfg=cfg, encoder=create_encoder(cfg.encoder, weights=encoder_weights))


__all__ = [
    "ENCODERS",
    "MODELS",
    "ImageEncoder",
    "MclSTExp",
    "ProjectionHead",
    "STNet",
    "SpotEncoder",
    "TransformerBlock",
    "bleep_loss",
    "clip_loss",
    "create_encoder",
    "create_model",
]
