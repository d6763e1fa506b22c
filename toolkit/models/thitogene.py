"""THItoGene (Jia et al., Briefings in Bioinformatics 2024), after its public code
(github yrjia1015/THItoGene: ``vis_model.py``, ``ODConv.py``, ``efficient_capsnet.py``,
``GATLayer.py``, ``transformer.py``).

Per spot, the centre 112 px of its patch go through an omni-dimensional dynamic
convolution (ODConv: 4 candidate 4 x 4 kernels, stride 4, to 16 channels, mixed per
image by attention over kernels, channels, filters and kernel positions), a ReLU, and an
Efficient-CapsNet (4 convolutions with BN and ReLU, 16 primary capsules of 8 from a
depthwise convolution, self-attention routing to ``capsules`` capsules of
``capsule_dim``). Two more tokens of ``capsule_dim``, learned ``x_embed[x]`` and
``y_embed[y]``, join them and the ``(capsules + 2) * capsule_dim = 1408`` values of each
spot are one token of a ViT over the whole section (``depth`` 4 blocks, ``heads`` 16 x
``dim_head`` 64, feed-forward ``2 * embed_dim``, dropout); a two-layer GAT over the spot
graph (4 nearest spots: :func:`~mclx.models.graph.knn_adjacency`; ``graph_heads`` 8
heads of ``embed_dim``, then one of ``embed_dim / 2``), and ``Linear -> ReLU ->
LayerNorm -> Linear`` give G genes. Trained with MSE, as the reference.

The dynamic convolution is written as a per-image matrix product over the image's
non-overlapping 4 x 4 blocks (the reference's grouped convolution with one group per
image bakes the batch size into an exported graph); the two are the same sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mclx.config import ModelCfg
from mclx.models.backbones import feature_width
from mclx.models.graph import MultiHeadGAT
from mclx.models.layers import TransformerBlock
from mclx.models.section import SectionRegressor

_ODCONV_OUT, _PRIMARY, _PRIMARY_DIM = 16, 16, 8  # fixed in the reference


class ODConv2d(nn.Module):
    """Omni-dimensional dynamic convolution (Li et al., ICLR 2022) with stride equal to
    the kernel size and no padding, as THItoGene uses it."""

    def __init__(
        self, cin: int, cout: int, kernel: int, *, kernel_num: int = 4, reduction: float = 0.0625
    ) -> None:
        super().__init__()
        hidden = max(int(cin * reduction), 16)
        self.cin, self.cout, self.kernel, self.kernel_num = cin, cout, kernel, kernel_num
        self.fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
        )
        self.channel_fc = nn.Conv2d(hidden, cin, 1)
        self.filter_fc = nn.Conv2d(hidden, cout, 1)
        self.spatial_fc = nn.Conv2d(hidden, kernel * kernel, 1)
        self.kernel_fc = nn.Conv2d(hidden, kernel_num, 1)
        # (kernel_num * cout, cin, k, k): 4-D, as torch's channels_last wants every weight
        self.weight = nn.Parameter(torch.empty(kernel_num * cout, cin, kernel, kernel))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i in range(kernel_num):  # each candidate kernel as its own (cout, cin, k, k)
            nn.init.kaiming_normal_(
                self.weight[i * cout : (i + 1) * cout], mode="fan_out", nonlinearity="relu"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[1:]
        k = self.kernel
        a = self.fc(x)
        channel = torch.sigmoid(self.channel_fc(a)).reshape(-1, c, 1, 1)
        filt = torch.sigmoid(self.filter_fc(a)).reshape(-1, 1, self.cout)
        spatial = torch.sigmoid(self.spatial_fc(a)).reshape(-1, 1, 1, 1, k, k)
        mix = self.kernel_fc(a).reshape(-1, self.kernel_num, 1, 1, 1, 1).softmax(dim=1)
        kernels = self.weight.reshape(1, self.kernel_num, self.cout, c, k, k)
        weight = (mix * spatial * kernels).sum(1)  # (n, cout, cin, k, k)
        x = (x * channel)[:, :, : h // k * k, : w // k * k]
        gh, gw = h // k, w // k
        blocks = (
            x.reshape(-1, c, gh, k, gw, k).permute(0, 2, 4, 1, 3, 5).reshape(-1, gh * gw, c * k * k)
        )
        out = blocks @ weight.reshape(-1, self.cout, c * k * k).transpose(1, 2)  # (n, gh gw, cout)
        return (out * filt).transpose(1, 2).reshape(-1, self.cout, gh, gw)


def squash(x: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    """Efficient-CapsNet's squash: ``(1 - 1 / exp(|x|)) x / |x|`` over the last axis."""
    n = x.norm(dim=-1, keepdim=True)
    return (1 - 1 / (torch.exp(n) + eps)) * (x / (n + eps))


class CapsuleEncoder(nn.Module):
    """Efficient-CapsNet (Mazzia et al. 2021) as THItoGene builds it: (N, 16, s, s) ->
    (N, capsules, capsule_dim)."""

    def __init__(self, size: int, capsules: int, capsule_dim: int) -> None:
        super().__init__()
        chans = [(_ODCONV_OUT, 32, 5, 1), (32, 64, 3, 1), (64, 64, 3, 1), (64, 128, 3, 2)]
        layers: list[nn.Module] = []
        for cin, cout, k, stride in chans:
            conv = nn.Conv2d(cin, cout, k, stride=stride)
            nn.init.kaiming_normal_(conv.weight)
            layers += [conv, nn.BatchNorm2d(cout), nn.ReLU()]
            size = (size - k) // stride + 1
        if size < 1:
            msg = "thitogene: the crop is too small for the capsule network's convolutions"
            raise ValueError(msg)
        self.convs = nn.Sequential(*layers)
        # depthwise to 1 x 1 (the reference's 9 x 9 kernel at 112 px)
        self.primary = nn.Conv2d(128, 128, size, groups=128)
        self.W = nn.Parameter(torch.empty(capsules, _PRIMARY, _PRIMARY_DIM, capsule_dim))
        self.b = nn.Parameter(torch.zeros(capsules, _PRIMARY, 1))
        nn.init.kaiming_normal_(self.W)
        self.capsule_dim = capsule_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = squash(self.primary(self.convs(x)).reshape(-1, _PRIMARY, _PRIMARY_DIM))
        u = torch.einsum("nji,kjiz->nkjz", u, self.W)  # (N, caps, 16, dim)
        c = (u * u.sum(2, keepdim=True)).sum(-1, keepdim=True) / self.capsule_dim**0.5
        c = c.softmax(dim=1) + self.b  # over the output capsules, as the reference
        return squash((u * c).sum(2))


class THItoGene(SectionRegressor):
    """ODConv + capsules + ViT over the section + GAT over the spot graph."""

    def __init__(self, cfg: ModelCfg, image_encoder: nn.Module) -> None:
        super().__init__(cfg, image_encoder)
        cd, d = cfg.capsule_dim, cfg.embed_dim
        if self.crop is not None:
            self.odconv: nn.Module | None = ODConv2d(3, _ODCONV_OUT, 4)
            self.caps: nn.Module = CapsuleEncoder(self.crop // 4, cfg.capsules, cd)
        else:  # pooled features of another encoder: one linear layer to the capsules
            self.odconv = None
            self.caps = nn.Linear(feature_width(cfg, image_encoder), cfg.capsules * cd)
        if cfg.pos_embed:
            self.x_embed = nn.Embedding(self.pos_size[0], cd)
            self.y_embed = nn.Embedding(self.pos_size[1], cd)
        else:
            self.x_embed = self.y_embed = None
        width = (cfg.capsules + (2 if cfg.pos_embed else 0)) * cd
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(
            *[
                TransformerBlock(width, cfg.heads, cfg.dim_head, 2 * d, dropout=cfg.dropout)
                for _ in range(cfg.depth)
            ]
        )
        self.gat = MultiHeadGAT(
            width, d, d // 2, heads=cfg.graph_heads, dropout=cfg.dropout, alpha=0.01
        )
        self.gene_head = nn.Sequential(
            nn.Linear(d // 2, d), nn.ReLU(), nn.LayerNorm(d), nn.Linear(d, cfg.n_genes)
        )

    def embed_image_features(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One section's encoder features (N, F) and array coordinates (N, 2) -> (N, G)."""
        pos = self.check_positions(pos)
        if self.odconv is not None:
            x = self.caps(F.relu(self.odconv(self.pixels(feats)))).flatten(1)
        else:
            x = self.caps(self.feature_norm(feats))
        if self.x_embed is not None:
            x = torch.cat([x, self.x_embed(pos[:, 0]), self.y_embed(pos[:, 1])], dim=1)
        x = self.blocks(self.dropout(x).unsqueeze(0)).squeeze(0)
        return self.gene_head(self.gat(x, self.adjacency(pos)))
