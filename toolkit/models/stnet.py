"""ST-Net (He et al. 2020): DenseNet-121 features -> linear layer to G genes, MSE loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mclx.config import ModelCfg
from mclx.models.backbones import ImageEncoder, encode, feature_width


class STNet(nn.Module):
    """Direct regression of expression from the image."""

    kind = "regression"

    def __init__(self, cfg: ModelCfg, image_encoder: ImageEncoder) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = image_encoder
        self.head = nn.Linear(feature_width(cfg, image_encoder), cfg.n_genes)

    def embed_image_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, F) -> predicted expression (N, G)."""
        return self.head(feats)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_image_features(encode(self.image_encoder, images))

    def loss(self, feats: torch.Tensor, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.embed_image_features(feats), expr)
