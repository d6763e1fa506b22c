"""Image encoders: torchvision backbones -> global average pool -> feature vector.

Every encoder answers ``num_features``, ``forward_features`` (the feature map, or a
ViT's tokens), ``forward_tokens`` (N x T x F: a feature map's positions, a ViT's
tokens) and ``forward`` (pooled features, the mean of the tokens). ViTs are in
:mod:`mclx.models.vit`; :func:`patch112` is HisToGene's parameter-free pixel input.
Weights come from torchvision's local cache when present, or from ``weights_file``;
nothing is downloaded. Random initialisation is allowed, with a
warning, so that tests and air-gapped machines still work.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from mclx.models.registry import Registry

ENCODERS = Registry("image encoder")
_WARNED: set[str] = set()  # warn about random initialisation once per encoder


class ImageEncoder(nn.Module):
    """A backbone's feature extractor followed by ReLU (DenseNet) and average pooling."""

    def __init__(self, features: nn.Module, num_features: int, final_relu: bool) -> None:
        super().__init__()
        self.features = features
        self.num_features = num_features
        self.final_relu = final_relu

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return torch.relu(x) if self.final_relu else x

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map's positions as tokens (N, H * W, F)."""
        return self.forward_features(x).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


class PixelEncoder(nn.Module):
    """The centre ``crop`` x ``crop`` pixels of a patch, flattened (channel, row,
    column): HisToGene's input, whose patch embedding is a linear layer on the pixels.
    No parameters; a patch smaller than ``crop`` is refused."""

    def __init__(self, crop: int) -> None:
        super().__init__()
        self.crop = crop
        self.num_features = 3 * crop * crop

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < self.crop or w < self.crop:
            msg = f"patches of {h} x {w} px are smaller than the encoder's {self.crop} px crop"
            raise ValueError(msg)
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        return x[:, :, top : top + self.crop, left : left + self.crop]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).flatten(1)


def _cached_weights(weights) -> Path | None:
    """Path of torchvision's cached file for ``weights`` when it is on disk."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    return path if path.is_file() else None


_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def load_weights_file(model: nn.Module, weights: str | os.PathLike) -> None:
    """Load an encoder's weights from a file given by the user (which must exist)."""
    path = Path(weights)
    if not path.is_file():
        msg = f"{path}: encoder weights file does not exist"
        raise FileNotFoundError(msg)
    _load_backbone_weights(model, path)


def _load_backbone_weights(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        msg = f"{path}: cannot load encoder weights ({exc.__class__.__name__}: {exc})"
        raise ValueError(msg) from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    fixed = {}
    for key, value in state.items():
        m = _DENSENET_KEY.match(key)
        fixed[m.group(1) + m.group(2) if m else key] = value
    missing, unexpected = model.load_state_dict(fixed, strict=False)
    missing = [k for k in missing if not k.startswith(("classifier", "fc"))]
    if missing:
        msg = f"{path}: encoder weights lack {len(missing)} tensors (first: {missing[0]})"
        raise ValueError(msg)


def _build(ctor, weights_enum, weights: str | os.PathLike | None, *, name: str) -> nn.Module:
    """Construct a torchvision model, loading weights only from local files.

    ``weights``: ``"imagenet"`` (torchvision's cache, error when absent), ``"auto"``
    (cache when present, else random init with a warning), a file path, or None (random).
    """
    if weights in ("auto", "imagenet"):
        cached = _cached_weights(weights_enum)
        if cached is not None:
            return ctor(weights=weights_enum)
        if weights == "imagenet":
            want = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_enum.url)
            msg = (
                f"{name}: ImageNet weights not in torchvision's cache: put {want.name} "
                f"(torchvision's {weights_enum.name} file) at {want}, or give the file with "
                "--encoder-weights FILE"
            )
            raise FileNotFoundError(msg)
        if name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(
                f"{name}: no ImageNet weights in {torch.hub.get_dir()}/checkpoints and no "
                "--encoder-weights file; using random initialisation",
                stacklevel=2,
            )
        return ctor(weights=None)
    model = ctor(weights=None)
    if weights is not None:
        load_weights_file(model, weights)
    return model


@ENCODERS.register
def densenet121(weights: str | os.PathLike | None = "auto") -> ImageEncoder:
    """DenseNet-121 (1024 features), the mclSTExp / ST-Net / BLEEP image encoder."""
    from torchvision.models import DenseNet121_Weights
    from torchvision.models import densenet121 as ctor

    model = _build(ctor, DenseNet121_Weights.IMAGENET1K_V1, weights, name="densenet121")
    return ImageEncoder(model.features, 1024, final_relu=True)


@ENCODERS.register
def resnet50(weights: str | os.PathLike | None = "auto") -> ImageEncoder:
    """ResNet-50 (2048 features)."""
    from torchvision.models import ResNet50_Weights
    from torchvision.models import resnet50 as ctor

    model = _build(ctor, ResNet50_Weights.IMAGENET1K_V2, weights, name="resnet50")
    features = nn.Sequential(*list(model.children())[:-2])
    return ImageEncoder(features, 2048, final_relu=False)


@ENCODERS.register
def tiny_cnn(weights: str | os.PathLike | None = None) -> ImageEncoder:
    """A 4-layer CNN (64 features) for fast tests and demos; never pretrained.

    Kaiming-initialised and without normalisation layers, so that even untrained its
    pooled features keep the scale of the input's colour and texture.
    """
    layers: list[nn.Module] = []
    chans = [3, 16, 32, 64, 64]
    for cin, cout in zip(chans[:-1], chans[1:]):
        conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU()]
    features = nn.Sequential(*layers)
    if weights not in (None, "auto"):
        _load_backbone_weights(features, Path(weights))
    return ImageEncoder(features, 64, final_relu=False)


@ENCODERS.register
def patch112(weights: str | os.PathLike | None = None) -> PixelEncoder:
    """The centre 112 x 112 px of the patch, flattened (37,632 features): HisToGene's
    input (its reference cuts 112 px spot patches; mclx cuts 224 px, same centre)."""
    if weights not in (None, "auto"):
        msg = f"{weights}: patch112 has no weights to load"
        raise ValueError(msg)
    return PixelEncoder(112)


def create_encoder(name: str, *, weights: str | os.PathLike | None = "auto") -> ImageEncoder:
    """Build a registered image encoder (``KeyError`` with close matches if unknown), or
    ``timm:NAME``, any timm model (:mod:`mclx.models.timm_encoder`)."""
    from mclx.models.timm_encoder import create_timm_encoder, is_timm

    if is_timm(name):
        return create_timm_encoder(name, weights=weights)
    return ENCODERS.create(name, weights=weights)


def encode(encoder, images: torch.Tensor) -> torch.Tensor:
    """Pooled features of an image batch whose channels hold one or more views of each
    patch: (N, 3 V, H, W) -> (N, V F), each 3-channel view through ``encoder`` (a module
    or any callable on N x 3 x H x W, e.g. a frozen trace) in one call on V N images,
    joined along the features in channel order. V = 2 is a ``--context-fov`` model's
    input: the patch, then its wider field of view (the ``[own, wide]`` blocks of
    :mod:`mclx.training.context`)."""
    c, h, w = (int(d) for d in images.shape[1:])  # constants in an exported graph
    if c == 3:
        return encoder(images)
    if c % 3:
        msg = f"image batches hold 3-channel views; {c} channels is not a whole number of them"
        raise ValueError(msg)
    v = c // 3
    views = images.reshape(-1, v, 3, h, w).transpose(0, 1).reshape(-1, 3, h, w)
    feats = encoder(views)
    f = int(feats.shape[-1])  # the batch stays dynamic; the head never reads the input
    return feats.reshape(v, -1, f).transpose(0, 1).reshape(-1, v * f)


def feature_width(cfg, encoder: nn.Module) -> int:
    """Width of the features a model's heads read: the encoder's ``num_features`` times
    the blocks of its frozen feature input (own, wide field of view, neighbourhood:
    :func:`mclx.config.context_blocks`)."""
    from mclx.config import context_blocks

    return int(encoder.num_features) * context_blocks(cfg)
