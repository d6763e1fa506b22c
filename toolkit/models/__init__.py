"""Model registry: ``create_model(cfg)`` builds any registered method from its config.

Registered models: ``mclstexp`` (the paper), ``bleep``, ``stnet``, ``cmrcnet``,
``histogene``, ``his2st`` and ``thitogene`` (comparison methods; the last two with a
graph over the spots, :mod:`mclx.models.graph`), ``knn`` and ``ridge`` (training-free baselines on
frozen features, :mod:`mclx.models.baselines`), each with the defaults of its
publication: its architecture (:func:`model_cfg`), its training recipe
(:func:`train_cfg`) and its pixel normalisation (:func:`preprocess_defaults`).
Registered image encoders: see :data:`ENCODERS` (``densenet121`` by default; ViTs in
:mod:`mclx.models.vit`; any timm model as ``timm:NAME``, :mod:`mclx.models.timm_encoder`).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from mclx.config import ModelCfg, TrainCfg
from mclx.models import vit  # noqa: F401  (registers the ViT encoders)
from mclx.models.backbones import ENCODERS, ImageEncoder, create_encoder
from mclx.models.baselines import KNN, RidgeProbe
from mclx.models.bleep import bleep_loss
from mclx.models.cmrcnet import CMRCNet
from mclx.models.his2st import His2ST
from mclx.models.histogene import HisToGene
from mclx.models.layers import ProjectionHead, TransformerBlock
from mclx.models.mclstexp import MclSTExp, SpotEncoder, clip_loss
from mclx.models.registry import Registry
from mclx.models.stnet import STNet
from mclx.models.thitogene import THItoGene

MODELS = Registry("model")
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


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


# a ViT-B/32 over tokens, no positions; the top 50 neighbours averaged; AdamW with a
# cosine decay, flips and 90-degree rotations, ImageNet mean / std (its public code)
@MODELS.register(
    defaults={"encoder": "vit_b32", "pos_embed": False, "k": 50, "weighting": "mean"},
    train={
        "epochs": 60, "batch_size": 64, "optimizer": "adamw", "min_lr": 1e-5,
        "augmentation": "dihedral",
    },
    preprocess=IMAGENET,
)  # fmt: skip
def cmrcnet(cfg: ModelCfg, encoder: nn.Module) -> CMRCNet:
    return CMRCNet(cfg, encoder)


# a ViT over a section's flattened 112 px patches (width 1024, 8 blocks, 16 heads);
# one section per step, Adam 1e-5, 100 epochs, no augmentation (its tutorial)
@MODELS.register(
    defaults={
        "encoder": "patch112", "embed_dim": 1024, "depth": 8, "heads": 16, "dim_head": 64,
        "context": "section", "k": 0,
    },
    train={"epochs": 100, "lr": 1e-5, "weight_decay": 0.0, "augment": False},
)  # fmt: skip
def histogene(cfg: ModelCfg, encoder: nn.Module) -> HisToGene:
    return HisToGene(cfg, encoder)


# ConvMixer on the 112 px crops, 8 Transformer blocks (16 heads) over the section, 4
# GraphSAGE layers over the 4 nearest spots within 2 array units, LSTM jumping knowledge;
# MSE + 0.25 ZINB of the raw counts + 0.5 self-distillation over 5 augmented copies;
# one section per step, Adam 1e-5 decayed by 0.9 every 50 epochs, 350 epochs, no
# augmentation (HIST2ST_train.py)
@MODELS.register(
    defaults={
        "encoder": "patch112", "embed_dim": 1024, "depth": 8, "heads": 16, "dim_head": 64,
        "dropout": 0.2, "context": "section", "k": 0, "graph_k": 4, "graph_radius": 2.0,
        "graph_depth": 4, "zinb": 0.25, "distill": 0.5,
    },
    train={
        "epochs": 350, "lr": 1e-5, "weight_decay": 0.0, "augment": False, "lr_step": 50,
        "lr_gamma": 0.9,
    },
)  # fmt: skip
def his2st(cfg: ModelCfg, encoder: nn.Module) -> His2ST:
    return His2ST(cfg, encoder)


# ODConv + capsules on the 112 px crops, a ViT (4 blocks, 16 heads) over the section, a
# GAT (8 heads) over the 4 nearest spots; one section per step, Adam 1e-5, 300 epochs,
# no augmentation (its train.py for HER2+)
@MODELS.register(
    defaults={
        "encoder": "patch112", "embed_dim": 1024, "depth": 4, "heads": 16, "dim_head": 64,
        "dropout": 0.2, "context": "section", "k": 0, "graph_k": 4, "graph_heads": 8,
    },
    train={"epochs": 300, "lr": 1e-5, "weight_decay": 0.0, "augment": False},
)  # fmt: skip
def thitogene(cfg: ModelCfg, encoder: nn.Module) -> THItoGene:
    return THItoGene(cfg, encoder)


# the baselines fit in closed form on a frozen encoder's pooled features (no epochs)
_FROZEN = {"epochs": 0, "freeze_encoder": True, "augment": False}


# raw pooled features retrieved with mclSTExp's kernel: top 200, inverse-square L2
@MODELS.register(defaults={"pos_embed": False, "depth": 0}, train=_FROZEN, bank_source="image")
def knn(cfg: ModelCfg, encoder: nn.Module) -> KNN:
    return KNN(cfg, encoder)


# HEST-Bench's probe: PCA to 256 (embed_dim), ridge with alpha by CV over sections
@MODELS.register(defaults={"pos_embed": False, "depth": 0, "k": 0}, train=_FROZEN)
def ridge(cfg: ModelCfg, encoder: nn.Module) -> RidgeProbe:
    return RidgeProbe(cfg, encoder)


def model_cfg(name: str, **overrides: Any) -> ModelCfg:
    """The config of model ``name`` with its publication's defaults, then ``overrides``."""
    return ModelCfg(**{"name": name, **MODELS.meta(name)["defaults"], **overrides})


def train_cfg(name: str, **overrides: Any) -> TrainCfg:
    """The training recipe of model ``name`` (its publication's), then ``overrides``."""
    return TrainCfg(**{**MODELS.meta(name).get("train", {}), **overrides})


def preprocess_defaults(name: str, encoder: str | None = None) -> dict[str, Any]:
    """PreprocessCfg fields model ``name`` sets (ImageNet ``mean`` / ``std`` for CMRCNet),
    then those of its image ``encoder`` (a timm model's input size, mean and std)."""
    from mclx.models.timm_encoder import is_timm, timm_preprocess

    out = dict(MODELS.meta(name).get("preprocess", {}))
    if encoder and is_timm(encoder):
        out.update(timm_preprocess(encoder))
    return out


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
    "CMRCNet",
    "ENCODERS",
    "MODELS",
    "His2ST",
    "HisToGene",
    "ImageEncoder",
    "KNN",
    "MclSTExp",
    "ProjectionHead",
    "RidgeProbe",
    "STNet",
    "SpotEncoder",
    "THItoGene",
    "TransformerBlock",
    "bleep_loss",
    "clip_loss",
    "create_encoder",
    "create_model",
    "model_cfg",
    "preprocess_defaults",
    "train_cfg",
]
