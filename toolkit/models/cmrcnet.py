"""CMRCNet (Liu et al., Medical Image Analysis 2025): contrastive learning plus
cross-modal mask reconstruction, after its public code (github ngfufdrdh/CMRCNet).

- Image side: the encoder's tokens (ViT-B/32: 50 tokens), their mean ->
  ProjectionHead -> the image embedding. Gene side: ProjectionHead on the expression
  (no spot Transformer, no positions).
- Contrastive loss: BLEEP's soft-target loss, per spot.
- Reconstruction (training only): the expression becomes 8 gene tokens (Linear -> ELU ->
  AlphaDropout); the image tokens, projected to the embedding width, are masked element
  by element (kept with probability ``mask_keep``, no rescaling), attend to the gene
  tokens (4 heads), go through the fusion layers (self-attention + MLP, then additive
  cross-attention to the gene tokens), are mean-pooled and regressed onto the image
  embedding (MSE; the target is not detached, as in the reference).
- Loss: ``mean(log(1 + L_contrastive)) + log(1 + L_reconstruction)``.

At inference the reconstruction branch is not used: a query is the image embedding, a
bank holds the gene projections of the training spots (top 50, unweighted mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mclx.config import ModelCfg
from mclx.models.backbones import encode, feature_width
from mclx.models.bleep import bleep_loss
from mclx.models.layers import ProjectionHead
from mclx.models.vit import Attention, Mlp

GENE_TOKENS = 8  # the reference's Linear(G, 2048) viewed as 8 tokens of 256
CROSS_HEADS = 4  # heads of the first cross-attention (image tokens -> gene tokens)


class GeneTokens(nn.Module):
    """Expression (N, G) -> ``n`` gene tokens (N, n, D): ``Linear -> ELU -> AlphaDropout``
    (the reference's SNN block)."""

    def __init__(self, n_genes: int, dim: int, n: int = GENE_TOKENS, dropout: float = 0.25):
        super().__init__()
        self.n, self.dim = n, dim
        self.fc = nn.Linear(n_genes, n * dim)
        self.act = nn.ELU()
        self.drop = nn.AlphaDropout(dropout)

    def forward(self, expr: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.fc(expr))).view(-1, self.n, self.dim)


class CrossAttention(nn.Module):
    """The fusion layers' additive cross-attention: ``q = f_q(x)``, ``k = f_k(y)``
    (each ``Linear -> ReLU -> Dropout``), and per head ``v1(q) + softmax(q k^T /
    sqrt(d_h)) v2(k)``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.25) -> None:
        super().__init__()
        if dim % heads:
            msg = f"cross-attention width {dim} is not a multiple of {heads} heads"
            raise ValueError(msg)
        self.heads = heads
        self.fc_q = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.fc_k = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.fc_v1 = nn.Linear(dim, dim)
        self.fc_v2 = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q, k = self.fc_q(x), self.fc_k(y)
        v1, v2 = self._split(self.fc_v1(q)), self._split(self.fc_v2(k))
        q, k = self._split(q), self._split(k)
        attn = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        out = v1 + attn @ v2
        return out.transpose(1, 2).reshape(x.shape)


class FusionLayer(nn.Module):
    """Pre-norm self-attention and MLP (x4) over the image tokens, then
    ``x + CrossAttention(x, gene tokens)`` (the reference's ``Block_fusion_MCFN_2``)."""

    def __init__(self, dim: int, heads: int, drop: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, drop)
        self.cross = CrossAttention(dim, heads)

    def forward(self, x: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x + self.cross(x, genes)


class CMRCNet(nn.Module):
    """Image / expression projection heads aligned by the soft-target loss, with the
    cross-modal mask reconstruction branch for training.

    Trains on the image encoder's tokens (``feature_kind = "tokens"``); pooled features
    (N, F) are taken as one token each.
    """

    kind = "contrastive"
    feature_kind = "tokens"

    def __init__(self, cfg: ModelCfg, image_encoder: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        f, d = feature_width(cfg, image_encoder), cfg.embed_dim
        self.image_encoder = image_encoder
        self.image_projection = ProjectionHead(f, d, cfg.dropout)
        self.spot_projection = ProjectionHead(cfg.n_genes, d, cfg.dropout)
        self.gene_tokens = GeneTokens(cfg.n_genes, d)
        self.token_projection = nn.Linear(f, d)
        self.cross_attention = nn.MultiheadAttention(d, CROSS_HEADS, batch_first=True)
        n_layers = min(cfg.depth, 1) if cfg.fusion_shared else cfg.depth
        self.fusion = nn.ModuleList([FusionLayer(d, cfg.heads) for _ in range(n_layers)])

    @property
    def fusion_layers(self) -> list[nn.Module]:
        """The ``depth`` fusion layers in the order applied (one module repeated when
        shared)."""
        return [self.fusion[0 if self.cfg.fusion_shared else i] for i in range(self.cfg.depth)]

    def embed_image_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, F) or tokens (N, T, F) -> image embeddings (N, D)."""
        return self.image_projection(feats.mean(dim=1) if feats.ndim == 3 else feats)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image batch (N, 3, H, W) -> image embeddings (N, D): the query."""
        return self.embed_image_features(encode(self.image_encoder, images))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """What training reads of an image batch: the encoder's tokens (N, T, F)."""
        return self.image_encoder.forward_tokens(images)

    def embed_spots(self, expr: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Expression (N, G) -> gene projections (N, D), the bank's keys (no positions)."""
        return self.spot_projection(expr)

    def mask_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Training: each element kept with probability ``mask_keep``, else zero (no
        rescaling). Eval: ``x`` unchanged."""
        if not self.training:
            return x
        return x * (torch.rand_like(x) < self.cfg.mask_keep).to(x.dtype)

    def reconstruct(self, tokens: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
        """Masked image tokens (N, T, F) and expression -> reconstructed embedding (N, D)."""
        genes = self.gene_tokens(expr)
        masked = self.mask_tokens(self.token_projection(tokens))
        latent, _ = self.cross_attention(masked, genes, genes, need_weights=False)
        for layer in self.fusion_layers:
            latent = layer(latent, genes)
        return latent.mean(dim=1)

    def losses(self, feats: torch.Tensor, expr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(contrastive loss per spot (N,), reconstruction MSE) of one batch."""
        tokens = feats if feats.ndim == 3 else feats.unsqueeze(1)
        img = self.image_projection(tokens.mean(dim=1))
        spot = self.spot_projection(expr)
        contrastive = bleep_loss(spot, img, self.cfg.temperature, reduction="none")
        return contrastive, F.mse_loss(self.reconstruct(tokens, expr), img)

    def loss(self, feats: torch.Tensor, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``mean(log(1 + contrastive)) + log(1 + reconstruction)``."""
        contrastive, reconstruction = self.losses(feats, expr)
        return torch.log1p(contrastive).mean() + torch.log1p(reconstruction)
