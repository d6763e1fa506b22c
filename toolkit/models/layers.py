"""Building blocks shared by the models: projection head and pre-norm Transformer block."""

from __future__ import annotations

import torch
from torch import nn


def feature_stats(feats) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (N, F) -> (F,), (F,) in float32, computed in float64; a constant
    feature keeps std 1 (the training spots' statistics of ``feature_norm``)."""
    f = torch.as_tensor(feats, dtype=torch.float64)
    std = f.std(dim=0, unbiased=False)
    return f.mean(dim=0).float(), torch.where(std > 1e-12, std, torch.ones_like(std)).float()


class FeatureNorm(nn.Module):
    """``(x - mean) / std`` with the training spots' statistics (:func:`feature_stats`,
    set by :meth:`set_stats`, saved with the weights); the identity, with no buffers,
    when not ``enabled`` (checkpoints without it load unchanged)."""

    def __init__(self, width: int, enabled: bool) -> None:
        super().__init__()
        self.enabled = bool(enabled)
        if self.enabled:
            self.register_buffer("mean", torch.zeros(width))
            self.register_buffer("std", torch.ones(width))

    def set_stats(self, feats) -> None:
        self.mean, self.std = feature_stats(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.enabled else x


class ProjectionHead(nn.Module):
    """``p = Linear(in, d)(x); y = Dropout(Linear(d, d)(GELU(p))); LayerNorm(y + p)``."""

    def __init__(self, in_dim: int, out_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.projection(x)
        return self.layer_norm(self.dropout(self.fc(self.gelu(p))) + p)


class Attention(nn.Module):
    """Multi-head self-attention with ``heads * dim_head`` inner width (no qkv bias)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.dropout = dropout
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x))`` then ``x + FF(LN(x))`` with a GELU MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))
