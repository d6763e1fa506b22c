"""mclSTExp: DenseNet image encoder and Transformer spot encoder aligned by a CLIP loss.

The spot encoder adds learnable ``x_embed[x] + y_embed[y]`` to each spot's expression
vector and runs pre-norm Transformer blocks over a *sequence of spots* (a training batch
or a whole section). Both sides end in a :class:`ProjectionHead` to ``embed_dim``.
The same class with ``pos_embed=False, depth=0`` and BLEEP's loss is BLEEP (``bleep.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mclx.config import ModelCfg
from mclx.errors import DataError
from mclx.models.backbones import ImageEncoder, encode, feature_width
from mclx.models.layers import ProjectionHead, TransformerBlock, feature_stats


def clip_loss(spot_emb: torch.Tensor, img_emb: torch.Tensor, temperature: float = 1.0):
    """Symmetric cross-entropy of ``spot_emb @ img_emb.T / T`` against identity labels."""
    logits = spot_emb @ img_emb.T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class SpotEncoder(nn.Module):
    """Expression (+ positional embeddings) -> Transformer over the spot sequence."""

    def __init__(self, cfg: ModelCfg) -> None:
        super().__init__()
        self.pos_size = tuple(cfg.pos_size)
        if cfg.pos_embed:
            self.x_embed = nn.Embedding(self.pos_size[0], cfg.n_genes)
            self.y_embed = nn.Embedding(self.pos_size[1], cfg.n_genes)
        else:
            self.x_embed = self.y_embed = None
        self.blocks = nn.Sequential(
            *[
                TransformerBlock(cfg.n_genes, cfg.heads, cfg.dim_head, mlp_dim=cfg.n_genes)
                for _ in range(cfg.depth)
            ]
        )

    def forward(self, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``expr`` (N, G) and integer ``pos`` (N, 2) of one sequence -> (N, G)."""
        x = expr
        if self.x_embed is not None:
            pos = pos.long()
            if (
                (pos < 0).any()
                or (pos[:, 0] >= self.pos_size[0]).any()
                or (pos[:, 1] >= self.pos_size[1]).any()
            ):
                msg = (
                    f"spot array coordinates up to ({int(pos[:, 0].max())}, "
                    f"{int(pos[:, 1].max())}) exceed the model's positional tables "
                    f"{self.pos_size}"
                )
                raise DataError(msg)
            x = x + self.x_embed(pos[:, 0]) + self.y_embed(pos[:, 1])
        if len(self.blocks):
            x = self.blocks(x.unsqueeze(0)).squeeze(0)
        return x


class MclSTExp(nn.Module):
    """Contrastive image / spot model; ``loss_fn`` picks mclSTExp's or BLEEP's loss."""

    kind = "contrastive"

    def __init__(
        self,
        cfg: ModelCfg,
        image_encoder: ImageEncoder,
        loss_fn: Callable[..., torch.Tensor] = clip_loss,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = image_encoder
        self.image_projection = ProjectionHead(
            feature_width(cfg, image_encoder), cfg.embed_dim, cfg.dropout
        )
        self.spot_encoder = SpotEncoder(cfg)
        self.spot_projection = ProjectionHead(cfg.n_genes, cfg.embed_dim, cfg.dropout)
        self.loss_fn = loss_fn
        if cfg.feature_norm:  # training-set statistics, set by set_feature_stats
            self.register_buffer("feature_mean", torch.zeros(feature_width(cfg, image_encoder)))
            self.register_buffer("feature_std", torch.ones(feature_width(cfg, image_encoder)))

    def set_feature_stats(self, feats) -> None:
        """Mean and std (N, F) -> (F,) of the training spots' pooled features, for
        ``cfg.feature_norm`` (a constant feature keeps std 1)."""
        self.feature_mean, self.feature_std = feature_stats(feats)

    def embed_image_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (N, F) -> image embeddings (N, D)."""
        if self.cfg.feature_norm:
            feats = (feats - self.feature_mean) / self.feature_std
        return self.image_projection(feats)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image batch (N, 3, H, W) in the model's pixel scale -> embeddings (N, D)."""
        return self.embed_image_features(encode(self.image_encoder, images))

    def embed_spots(self, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One spot sequence (N, G), (N, 2) -> spot embeddings (N, D)."""
        return self.spot_projection(self.spot_encoder(expr, pos))

    def loss(self, feats: torch.Tensor, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Contrastive loss of one batch (image features, expressions, positions)."""
        img = self.embed_image_features(feats)
        spot = self.embed_spots(expr, pos)
        return self.loss_fn(spot, img, self.cfg.temperature)
