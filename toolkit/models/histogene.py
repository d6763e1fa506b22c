"""HisToGene (Pang, Su, Li 2021): a Vision Transformer over all spot patches of a section,
after its public code (github maxpmx/HisToGene).

Each spot's patch (by default the centre 112 x 112 px, flattened: the ``patch112``
encoder) is embedded by a linear layer, learned ``x_embed[x] + y_embed[y]`` of its array
coordinates are added, and pre-norm Transformer blocks (``depth`` x ``heads`` x
``dim_head``, feed-forward ``2 x embed_dim``, dropout on the embeddings and in the
blocks) attend over the whole section; ``LayerNorm -> Linear`` gives G genes, trained
with MSE. The original has width 1024, 8 blocks, 16 heads of 64; all are ModelCfg fields
(``embed_dim``, ``depth``, ``heads``, ``dim_head``) so that a CPU run can shrink them,
and the checkpoint records the ones used.

A prediction needs the whole section: ``model(images, positions)`` takes every spot of
it at once (``kind = "section"``), in training (``context = "section"``), evaluation
and the exported ONNX graph (inputs ``images`` and ``positions``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mclx.config import ModelCfg
from mclx.errors import DataError
from mclx.models.backbones import encode, feature_width
from mclx.models.layers import TransformerBlock
from mclx.models.section import pooled_feature_norm


class HisToGene(nn.Module):
    """Section-level regression: patches + array coordinates of one section -> (N, G)."""

    kind = "section"

    def __init__(self, cfg: ModelCfg, image_encoder: nn.Module) -> None:
        super().__init__()
        if cfg.context != "section":
            msg = f"histogene attends over whole sections; context {cfg.context!r} is not offered"
            raise ValueError(msg)
        self.cfg = cfg
        d = cfg.embed_dim
        self.image_encoder = image_encoder
        self.patch_embedding = nn.Linear(feature_width(cfg, image_encoder), d)
        crop = getattr(image_encoder, "crop", None)
        self.feature_norm = pooled_feature_norm(cfg, image_encoder, crop)
        self.pos_size = tuple(cfg.pos_size)
        if cfg.pos_embed:
            self.x_embed = nn.Embedding(self.pos_size[0], d)
            self.y_embed = nn.Embedding(self.pos_size[1], d)
        else:
            self.x_embed = self.y_embed = None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(
            *[
                TransformerBlock(d, cfg.heads, cfg.dim_head, mlp_dim=2 * d, dropout=cfg.dropout)
                for _ in range(cfg.depth)
            ]
        )
        self.gene_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.n_genes))

    def set_feature_stats(self, feats) -> None:
        """The training spots' pooled-feature statistics, for ``cfg.feature_norm``."""
        self.feature_norm.set_stats(feats)

    def _check(self, pos: torch.Tensor) -> None:
        if torch.jit.is_tracing():  # an exported graph takes the positions as they come
            return
        bad = (pos < 0).any() | (pos[:, 0] >= self.pos_size[0]).any()
        if bool(bad | (pos[:, 1] >= self.pos_size[1]).any()):
            msg = (
                f"spot array coordinates up to ({int(pos[:, 0].max())}, {int(pos[:, 1].max())}) "
                f"exceed the model's positional tables {self.pos_size}"
            )
            raise DataError(msg)

    def embed_image_features(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One section's pooled features (N, F) and array coordinates (N, 2) -> (N, G)."""
        x = self.patch_embedding(self.feature_norm(feats))
        if self.x_embed is not None:
            pos = pos.long()
            self._check(pos)
            x = x + self.x_embed(pos[:, 0]) + self.y_embed(pos[:, 1])
        x = self.blocks(self.dropout(x).unsqueeze(0)).squeeze(0)
        return self.gene_head(x)

    def forward(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Every spot of one section: images (N, 3, H, W), positions (N, 2) -> (N, G)."""
        return self.embed_image_features(encode(self.image_encoder, images), positions)

    def loss(self, feats: torch.Tensor, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """MSE of one section's predictions."""
        return F.mse_loss(self.embed_image_features(feats, pos), expr)
