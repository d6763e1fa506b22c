"""Model registry: ``create_model(cfg)`` builds any registered method from its config.

Registered models: ``mclstexp`` (the paper), ``bleep`` and ``stnet`` (comparison methods),
each with the defaults of its publication (:func:`model_cfg`). Registered image encoders:
see :data:`ENCODERS` (``densenet121`` by default).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from mclx.config import ModelCfg
from mclx.models.bleep import bleep_loss
from mclx.models.encoders import ENCODERS, ImageEncoder, create_encoder
from mclx.models.layers import ProjectionHead, TransformerBlock
from mclx.models.mclstexp import MclSTExp, SpotEncoder, clip_loss
from mclx.models.registry import Registry
from mclx.models.stnet import STNet

MODELS = Registry("model")


@MODELS.register(defaults={})
def mclstexp(cfg: ModelCfg, encoder: ImageEncoder) -> MclSTExp:
    return MclSTExp(cfg, encoder, clip_loss)


# no positions, no Transformer; the top 50 neighbours averaged
@MODELS.register(defaults={"pos_embed": False, "depth": 0, "k": 50, "weighting": "mean"})
def bleep(cfg: ModelCfg, encoder: ImageEncoder) -> MclSTExp:
    return MclSTExp(cfg, encoder, bleep_loss)


@MODELS.register(defaults={"pos_embed": False, "depth": 0, "k": 0})
def stnet(cfg: ModelCfg, encoder: ImageEncoder) -> STNet:
    return STNet(cfg, encoder)


def model_cfg(name: str, **overrides: Any) -> ModelCfg:
    """The config of model ``name`` with its publication's defaults, then ``overrides``."""
    return ModelCfg(**{"name": name, **MODELS.meta(name)["defaults"], **overrides})


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
    "model_cfg",
]
