"""Vision Transformer image encoders (timm's ``vision_transformer.py``, reduced to what
mclx needs): patch embedding, class token, learned position embeddings, pre-norm blocks.

``forward_tokens`` gives every token (class token first, N x (1 + P) x D), ``forward``
their mean: CMRCNet's image embedding is the mean of all 50 tokens of its ViT-B/32, and
its reconstruction branch reads the tokens. Attention is written as matrix products and
a softmax so that the ONNX graph is plain MatMul / Softmax (any runtime, INT8, TensorRT).

Registered: ``vit_b32`` (CMRCNet's encoder: 224 px, patch 32, width 768, depth 8, 8
heads) and ``vit_tiny`` (patch 32, width 64, depth 2, 4 heads: tests and CPU runs).
No pretrained weights: CMRCNet's reference initialises its ViT at random, as here.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from mclx.models.backbones import ENCODERS


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` convolution -> tokens (N, P, D)."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, ``dim / heads`` per head, qkv with bias."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = True, drop: float = 0.0):
        super().__init__()
        if dim % heads:
            msg = f"attention width {dim} is not a multiple of {heads} heads"
            raise ValueError(msg)
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """``Linear -> GELU -> Dropout -> Linear -> Dropout``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block: ``x + Attn(LN(x))``, then ``x + Mlp(LN(x))``."""

    def __init__(
        self, dim: int, heads: int, *, mlp_ratio: float = 4.0, drop: float = 0.0, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_weights(m: nn.Module) -> None:
    """The reference's ViT initialisation (CMRCNet ``_init_vit_weights``)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """ViT over ``img_size`` images; other sizes (multiples of ``patch``) interpolate the
    position embeddings bicubically, as timm's ``dynamic_img_size`` does.

    Attributes:
        num_features: token width D.
        grid: patches per side at ``img_size``.
    """

    def __init__(
        self, *, img_size: int = 224, patch: int = 32, dim: int = 768, depth: int = 8,
        heads: int = 8, mlp_ratio: float = 4.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_features, self.grid = dim, img_size // patch
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> normalised tokens (N, 1 + P, D), class token first."""
        p = self.patch_embed.patch
        if x.shape[-2] % p or x.shape[-1] % p:
            msg = f"image of {tuple(x.shape[-2:])} px is not a multiple of the {p} px patch"
            raise ValueError(msg)
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self._pos_embed(
            x.shape[-2] // p, x.shape[-1] // p
        )
        return self.norm(self.blocks(tokens))

    forward_features = forward_tokens  # timm: a ViT's features are its tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of all tokens (N, D)."""
        return self.forward_tokens(x).mean(dim=1)


def _vit(weights: str | os.PathLike | None, name: str, **kw) -> VisionTransformer:
    model = VisionTransformer(**kw)
    if weights not in (None, "auto"):
        from mclx.models.backbones import load_weights_file

        if weights == "imagenet":
            msg = f"{name}: no ImageNet weights are offered (CMRCNet trains its ViT from scratch)"
            raise FileNotFoundError(msg)
        load_weights_file(model, weights)
    return model


@ENCODERS.register
def vit_b32(weights: str | os.PathLike | None = "auto") -> VisionTransformer:
    """ViT-B/32 as CMRCNet builds it: 224 px, patch 32, width 768, depth 8, 8 heads
    (49 patch tokens + the class token); random initialisation unless a file is given."""
    return _vit(weights, "vit_b32", patch=32, dim=768, depth=8, heads=8)


@ENCODERS.register
def vit_tiny(weights: str | os.PathLike | None = "auto") -> VisionTransformer:
    """A small ViT (patch 32, width 64, depth 2, 4 heads) for tests and CPU runs."""
    return _vit(weights, "vit_tiny", patch=32, dim=64, depth=2, heads=4)
