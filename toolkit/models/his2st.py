"""His2ST (Zeng et al., Briefings in Bioinformatics 2022), after its public code
(github biomed-AI/Hist2ST, ``HIST2ST.py``, ``gcn.py``, ``transformer.py``).

Per spot, a ConvMixer reads the centre 112 px of its patch: a ``mixer_patch`` px
strided convolution to ``mixer_channels`` channels (no activation, as the reference),
dropout, ``mixer_depth`` blocks (``x + GELU(BN(dw(GELU(BN(dw(x))))))`` then ``BN(GELU(
pw(x)))``, depthwise kernel ``mixer_kernel``), a 1 x 1 convolution to ``channels / 8``
and a flatten: ``(112 / 7)^2 * 32 / 8 = 1024`` features, the model width
(``embed_dim``; a linear layer maps them when the two differ). Learned ``x_embed[x] +
y_embed[y]`` are added, ``depth`` pre-norm Transformer blocks (``heads`` x
``dim_head``, feed-forward of the model width, dropout) attend over the whole section,
then ``graph_depth`` GraphSAGE mean layers over the spot graph (4 nearest spots within
2 array units, :func:`~mclx.models.graph.knn_adjacency`); a 2-layer LSTM reads the
graph layers' outputs as a sequence (jumping knowledge) and its outputs are averaged;
``LayerNorm -> Linear`` gives G genes.

Loss: the MSE of that prediction on the preprocessed expression. The reference adds
two auxiliary terms that mclx does not train: a ZINB likelihood (weight 0.25) of the
raw counts from three further heads, and self-distillation (weight 0.5) against five
augmented passes of the whole section. The first needs the raw counts and their size
factors, which mclx's training loop does not hand to a model (it sees the preprocessed
expression only); the second needs the patches themselves at every step (six passes
of the section through the encoder) and cannot apply to cached features of a frozen
encoder. Neither changes what is predicted: the gene head the reference evaluates is
the one the MSE trains.
"""

from __future__ import annotations

import torch
from torch import nn

from mclx.config import ModelCfg
from mclx.models.graph import MeanGraphLayer
from mclx.models.layers import TransformerBlock
from mclx.models.section import SectionRegressor


class ConvMixerBlock(nn.Module):
    """His2ST's ConvMixer block: two depthwise convolutions (BN, GELU) with a residual,
    then a pointwise convolution, GELU and BN."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.dw = nn.Sequential(
            nn.Conv2d(dim, dim, kernel, groups=dim, padding=kernel // 2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.Conv2d(dim, dim, kernel, groups=dim, padding=kernel // 2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
        )
        self.pw = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x) + x)


class ConvMixer(nn.Module):
    """Pixels (N, 3, c, c) -> (N, (c / patch)^2 * channels / 8)."""

    def __init__(self, cfg: ModelCfg, crop: int) -> None:
        super().__init__()
        ch, patch = cfg.mixer_channels, cfg.mixer_patch
        if cfg.mixer_kernel % 2 == 0 or ch < 8 or crop < patch:
            msg = (
                f"his2st: ConvMixer needs an odd kernel, at least 8 channels and a patch "
                f"within the {crop} px crop (kernel {cfg.mixer_kernel}, channels {ch}, "
                f"patch {patch})"
            )
            raise ValueError(msg)
        self.patch_embedding = nn.Conv2d(3, ch, patch, stride=patch)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(
            *[ConvMixerBlock(ch, cfg.mixer_kernel) for _ in range(cfg.mixer_depth)]
        )
        self.down = nn.Conv2d(ch, ch // 8, 1)
        self.num_features = (crop // patch) ** 2 * (ch // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.dropout(self.patch_embedding(x)))
        return self.down(x).flatten(1)


class His2ST(SectionRegressor):
    """ConvMixer + Transformer over the section + GraphSAGE over the spot graph."""

    def __init__(self, cfg: ModelCfg, image_encoder: nn.Module) -> None:
        super().__init__(cfg, image_encoder)
        d = cfg.embed_dim
        if self.crop is not None:
            self.mixer: nn.Module | None = ConvMixer(cfg, self.crop)
            n_in = self.mixer.num_features
        else:
            self.mixer, n_in = None, image_encoder.num_features
        self.patch_embedding = nn.Identity() if n_in == d else nn.Linear(n_in, d)
        if cfg.pos_embed:
            self.x_embed = nn.Embedding(self.pos_size[0], d)
            self.y_embed = nn.Embedding(self.pos_size[1], d)
        else:
            self.x_embed = self.y_embed = None
        self.blocks = nn.Sequential(
            *[
                TransformerBlock(d, cfg.heads, cfg.dim_head, mlp_dim=d, dropout=cfg.dropout)
                for _ in range(cfg.depth)
            ]
        )
        self.graph = nn.ModuleList([MeanGraphLayer(d, d) for _ in range(cfg.graph_depth)])
        self.jknet = nn.LSTM(d, d, num_layers=2) if cfg.graph_depth else None
        self.gene_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.n_genes))

    def embed_image_features(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One section's encoder features (N, F) and array coordinates (N, 2) -> (N, G)."""
        pos = self.check_positions(pos)
        x = self.mixer(self.pixels(feats)) if self.mixer is not None else feats
        x = self.patch_embedding(x)
        if self.x_embed is not None:
            x = x + self.x_embed(pos[:, 0]) + self.y_embed(pos[:, 1])
        g = self.blocks(x.unsqueeze(0)).squeeze(0)
        if self.jknet is not None:
            adj = self.adjacency(pos)
            layers = []
            for layer in self.graph:
                g = layer(g, adj)
                layers.append(g)
            g = self.jknet(torch.stack(layers))[0].mean(0)  # (L, N, d): L steps of N spots
        return self.gene_head(g)
