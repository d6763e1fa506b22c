"""What the graph models (His2ST, THItoGene) share as section-level regressors.

Like HisToGene (:mod:`mclx.models.histogene`) they predict every spot of a section at
once from its patches and array coordinates (``kind = "section"``, ``context =
"section"``): ``model(images, positions)`` in the exported graph and at inference,
``model.loss(features, expr, positions)`` (MSE on the preprocessed expression) in
training. Their published patch modules read pixels: with the ``patch112`` encoder (a
parameter-free centre crop, flattened) :meth:`SectionRegressor.pixels` gives the crop
back as images; any other encoder's pooled features go through a linear layer instead
(an mclx variant, for comparisons on one shared frozen encoder).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mclx.config import ModelCfg, context_blocks
from mclx.errors import DataError
from mclx.models.backbones import encode, feature_width
from mclx.models.graph import knn_adjacency
from mclx.models.layers import FeatureNorm


def pooled_feature_norm(cfg: ModelCfg, image_encoder: nn.Module, crop) -> FeatureNorm:
    """``cfg.feature_norm`` for a section model: the frozen encoder's pooled features
    standardised before the model's first layer (an mclx option, as for mclstexp: a
    random-init encoder's features vary far less between spots than their mean);
    refused with the pixel-reading patch modules."""
    if cfg.feature_norm and crop is not None:
        msg = (
            f"{cfg.name}: feature standardisation applies to a frozen encoder's pooled "
            "features (e.g. --encoder densenet121 --freeze-encoder), not to pixel crops"
        )
        raise ValueError(msg)
    return FeatureNorm(feature_width(cfg, image_encoder), cfg.feature_norm)


class SectionRegressor(nn.Module):
    """Base of the section-level graph models: checks, graph, forward and loss.

    Subclasses implement ``embed_image_features(feats, pos) -> (N, G)``.
    """

    kind = "section"

    def __init__(self, cfg: ModelCfg, image_encoder: nn.Module) -> None:
        super().__init__()
        if cfg.context != "section":
            msg = f"{cfg.name} reads whole sections; context {cfg.context!r} is not offered"
            raise ValueError(msg)
        if cfg.graph_k < 1:
            msg = f"{cfg.name}: graph_k {cfg.graph_k} must be at least 1 neighbour"
            raise ValueError(msg)
        self.cfg = cfg
        self.image_encoder = image_encoder
        self.pos_size = tuple(cfg.pos_size)
        crop = getattr(image_encoder, "crop", None)
        # the published patch modules read the crop's pixels; other encoders' features
        # are pooled vectors
        self.crop: int | None = int(crop) if crop is not None else None
        if self.crop is not None and context_blocks(cfg) > 1:
            msg = (
                f"{cfg.name}: its {cfg.encoder} modules read a patch's pixels, so "
                "--context-fov / --context-mode concat (joined features) need a feature "
                "encoder (e.g. --encoder densenet121)"
            )
            raise ValueError(msg)
        self.feature_norm = pooled_feature_norm(cfg, image_encoder, self.crop)

    def set_feature_stats(self, feats) -> None:
        """The training spots' pooled-feature statistics, for ``cfg.feature_norm``."""
        self.feature_norm.set_stats(feats)

    def pixels(self, feats: torch.Tensor) -> torch.Tensor:
        """Flattened centre crops (N, 3 * c * c) -> images (N, 3, c, c)."""
        c = self.crop if self.crop is not None else math.isqrt(feats.shape[1] // 3)
        return feats.reshape(-1, 3, c, c)

    def check_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """``pos`` as int64, refused (DataError) when outside the positional tables."""
        pos = pos.long()
        if torch.jit.is_tracing():  # an exported graph takes the positions as they come
            return pos
        bad = (pos < 0).any() | (pos[:, 0] >= self.pos_size[0]).any()
        if bool(bad | (pos[:, 1] >= self.pos_size[1]).any()):
            msg = (
                f"spot array coordinates up to ({int(pos[:, 0].max())}, {int(pos[:, 1].max())}) "
                f"exceed the model's positional tables {self.pos_size}"
            )
            raise DataError(msg)
        return pos

    def adjacency(self, pos: torch.Tensor) -> torch.Tensor:
        """The section's spot graph (:func:`~mclx.models.graph.knn_adjacency`)."""
        return knn_adjacency(pos, self.cfg.graph_k, self.cfg.graph_radius)

    def embed_image_features(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Every spot of one section: images (N, 3, H, W), positions (N, 2) -> (N, G)."""
        return self.embed_image_features(encode(self.image_encoder, images), positions)

    def loss(self, feats: torch.Tensor, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """MSE of one section's predictions (the references' main term)."""
        return F.mse_loss(self.embed_image_features(feats, pos), expr)
