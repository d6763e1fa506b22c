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

Loss, as the reference's (``HIST2ST.py``, ``NB_module.py``): the MSE of that prediction
on the preprocessed expression; plus ``zinb`` (0.25) times a zero-inflated negative
binomial likelihood of the spot's raw counts, whose mean (times the spot's size
factor: its total count over the genes divided by the section's median), dispersion
and dropout probability come from three more linear heads on the same features (the
training loop hands the counts to a model that ``reads_counts``); plus ``distill``
(0.5) times the MSE between the prediction and a learned, per-spot weighted mean of
the predictions of ``distill_views`` (5) augmented copies of the section
(self-distillation; it reads the pixels, so it applies with the ``patch112`` encoder
only, and costs that many more passes per step). The extra heads are trained, not
used to predict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mclx.config import ModelCfg
from mclx.models.backbones import feature_width
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


def zinb_nll(
    x: torch.Tensor, mean: torch.Tensor, disp: torch.Tensor, pi: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Mean negative log-likelihood of counts ``x`` (N, G) under a ZINB of mean ``mean *
    scale[:, None]``, dispersion ``disp`` and dropout ``pi`` (the reference's formula,
    its 1e-10 guards included)."""
    eps = 1e-10
    mu = mean * scale.unsqueeze(1)
    t1 = torch.lgamma(disp + eps) + torch.lgamma(x + 1.0) - torch.lgamma(x + disp + eps)
    t2 = (disp + x) * torch.log(1.0 + mu / (disp + eps)) + x * (
        torch.log(disp + eps) - torch.log(mu + eps)
    )
    nonzero = t1 + t2 - torch.log(1.0 - pi + eps)
    zero = -torch.log(pi + (1.0 - pi) * torch.pow(disp / (disp + mu + eps), disp) + eps)
    return torch.where(x <= 1e-8, zero, nonzero).mean()


class ZINBHeads(nn.Module):
    """Mean ``clamp(exp(.), 1e-5, 1e6)``, dispersion ``clamp(softplus(.), 1e-4, 1e4)``
    and dropout ``sigmoid(.)`` heads, each a linear layer to G genes."""

    def __init__(self, dim: int, n_genes: int) -> None:
        super().__init__()
        self.mean = nn.Linear(dim, n_genes)
        self.disp = nn.Linear(dim, n_genes)
        self.pi = nn.Linear(dim, n_genes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = torch.clamp(torch.exp(self.mean(h)), 1e-5, 1e6)
        disp = torch.clamp(F.softplus(self.disp(h)), 1e-4, 1e4)
        return mean, disp, torch.sigmoid(self.pi(h))


def augment_section(images: torch.Tensor) -> torch.Tensor:
    """His2ST's distillation view of a section's images (N, 3, H, W): one draw for all of
    them (torchvision's transforms on the reference's stacked batch): grey scale with
    p = 0.1, a rotation by U(-90°, 90°) (nearest, zero fill), a horizontal flip with
    p = 0.2."""
    from torchvision.transforms.v2 import functional as TF

    if float(torch.rand(())) < 0.1:
        images = TF.rgb_to_grayscale(images, num_output_channels=3)
    images = TF.rotate(images, float(torch.empty(()).uniform_(-90.0, 90.0)))
    return TF.hflip(images) if float(torch.rand(())) < 0.2 else images


class His2ST(SectionRegressor):
    """ConvMixer + Transformer over the section + GraphSAGE over the spot graph."""

    def __init__(self, cfg: ModelCfg, image_encoder: nn.Module) -> None:
        super().__init__(cfg, image_encoder)
        d = cfg.embed_dim
        if self.crop is not None:
            self.mixer: nn.Module | None = ConvMixer(cfg, self.crop)
            n_in = self.mixer.num_features
        else:
            self.mixer, n_in = None, feature_width(cfg, image_encoder)
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
        self.zinb = ZINBHeads(d, cfg.n_genes) if cfg.zinb > 0 else None
        self.reads_counts = self.zinb is not None
        # self-distillation reads the pixels: with the published patch module only
        distill = cfg.distill > 0 and cfg.distill_views > 0 and self.mixer is not None
        self.coef = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 1)) if distill else None

    def embed_image_features(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One section's encoder features (N, F) and array coordinates (N, 2) -> (N, G)."""
        return self.gene_head(self.hidden(feats, pos))

    def loss(
        self, feats: torch.Tensor, expr: torch.Tensor, pos: torch.Tensor,
        counts: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """MSE of one section's predictions, plus ``cfg.zinb`` times the ZINB negative
        log-likelihood of its raw ``counts`` (when given: the MSE alone otherwise)."""
        h = self.hidden(feats, pos)
        pred = self.gene_head(h)
        loss = F.mse_loss(pred, expr)
        if self.coef is not None and self.training:
            loss = loss + self.cfg.distill * F.mse_loss(self.distilled(feats, pos), pred)
        if self.zinb is None or counts is None:
            return loss
        counts = counts.float()
        total = counts.sum(1)
        scale = total / total.median().clamp(min=1.0)  # the reference's size factors
        # float32 even under autocast: exp, lgamma and means up to 1e6 (beyond float16)
        with torch.autocast(h.device.type, enabled=False):
            nll = zinb_nll(counts, *self.zinb(h.float()), scale)
        return loss + self.cfg.zinb * nll

    def distilled(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Self-distillation's target: the predictions of ``cfg.distill_views`` augmented
        copies of the section (:func:`augment_section`), averaged per spot with the
        softmax over copies of the learned ``coef`` head."""
        images = self.pixels(feats)
        preds, weights = [], []
        for _ in range(self.cfg.distill_views):
            h = self.hidden(augment_section(images).flatten(1), pos)
            preds.append(self.gene_head(h))
            weights.append(self.coef(h))
        return (torch.stack(preds) * torch.stack(weights).softmax(dim=0)).sum(0)

    def hidden(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The features the heads read (N, width)."""
        pos = self.check_positions(pos)
        x = self.mixer(self.pixels(feats)) if self.mixer is not None else self.feature_norm(feats)
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
        return g
