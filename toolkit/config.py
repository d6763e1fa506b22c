"""Configuration dataclasses. Each round-trips through a checkpoint as a plain dict.

- :class:`PreprocessCfg`: how counts become model inputs (genes, normalisation, log base)
  and how pixels become patches (patch size, µm/px, pixel scaling). Read by training,
  bank building, export and the runtime alike.
- :class:`ModelCfg`: architecture (which model, which image encoder, ablations).
- :class:`TrainCfg`: the optimisation recipe (defaults are the reference recipe).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Context = Literal["batch", "section"]
ContextMode = Literal["mean", "concat"]
Distance = Literal["l1", "l2"]
Weighting = Literal["inverse_square", "mean"]
LogBase = Literal["10", "e"]
Optimizer = Literal["adam", "adamw"]
Augmentation = Literal["mclstexp", "dihedral"]
RecipeName = Literal["paper", "default"]  # mclx.training.recipe.RECIPES


@dataclass(frozen=True)
class PreprocessCfg:
    """Expression and pixel preprocessing, stored with every artifact.

    Attributes:
        genes: ordered gene names (the model's output / input columns).
        target_sum: library size each spot is scaled to, over ``genes`` only.
        log_base: ``"10"`` for log10(1 + x) (reference code, scprep's default) or ``"e"``.
        patch_size: side of the square patch centred on a spot, in pixels at ``mpp``.
        mpp: µm per pixel of the training images (None when unknown).
        mean, std: per-channel normalisation after scaling uint8 to ``[0, 1]`` (identity
            by default, as in the reference code).
        views_um: wider fields of view the model also reads (``--context-fov``), in µm a
            side: each a second crop around the patch's centre on the image's own µm/px,
            resized to ``patch_size`` and stacked after the patch on the channel axis
            (N x H x W x 3 (1 + len(views_um))). Empty: the patch alone.
    """

    genes: tuple[str, ...] = ()
    target_sum: float = 1e4
    log_base: LogBase = "10"
    patch_size: int = 224
    mpp: float | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    views_um: tuple[float, ...] = ()

    def channels(self) -> int:
        """Channels of the model's input: 3 (RGB) for the patch and for each view."""
        return 3 * (1 + len(self.views_um))


@dataclass(frozen=True)
class ModelCfg:
    """Architecture of one of the registered models.

    Attributes:
        name: a model of the registry (``mclx.models.MODELS``): ``mclstexp`` (the
            paper), ``bleep``, ``stnet``, ``cmrcnet``, ``histogene``, ``his2st`` or
            ``thitogene`` (comparison methods).
        encoder: image encoder registry name (``densenet121`` by default).
        n_genes: number of genes G (spot encoder width, ST-Net output size).
        embed_dim: shared embedding size of the projection heads (HisToGene, His2ST: the
            width of their Transformer over a section's spots; THItoGene: of its GAT
            heads and gene head, its feed-forward twice that).
        dropout: dropout of projection heads (HisToGene: of its Transformer).
        temperature: softmax temperature of the contrastive loss.
        pos_embed: learnable x/y positional embeddings (mclSTExp); False is an ablation.
        pos_size: rows of the x and y embedding tables, sized from the data.
        depth: number of Transformer blocks: over spots (mclSTExp; 0 is an ablation),
            CMRCNet's fusion layers, HisToGene's blocks over a section's patches.
        heads, dim_head: attention heads and their width (CMRCNet's fusion layers: heads
            of ``embed_dim / heads``).
        context: attention context, ``batch`` (reference) or ``section``.
        seq_len: spots per attention sequence in ``batch`` context (the training batch
            size); banks embed their spots in runs of this length, as training saw them.
        k, distance, weighting: retrieval defaults stored for inference.
        fusion_shared: CMRCNet applies one fusion layer ``depth`` times (its reference
            code appends the same layer twice); False gives each application its own.
        mask_keep: CMRCNet's probability that an element of the image tokens is kept
            by the training-time mask (no rescaling; no mask in eval mode).
        feature_norm: standardise the frozen encoder's pooled features with the mean and
            std of the training spots before the image projection (mclstexp, bleep, and
            the section models on a pooling encoder; an ablation for badly conditioned
            random-init features). The statistics are buffers of the model, so export
            and inference apply them too.
        graph_k, graph_radius: the spot graph of His2ST and THItoGene: each spot's
            ``graph_k`` nearest spots by array coordinates, those farther than
            ``graph_radius`` array units dropped (0: none dropped; His2ST 2.0).
        graph_depth: His2ST's graph layers (4); graph_heads: THItoGene's GAT heads (8).
        mixer_channels, mixer_kernel, mixer_patch, mixer_depth: His2ST's ConvMixer
            (32 channels, depthwise kernel 5, patch embedding 7 px, 2 blocks).
        capsules, capsule_dim: THItoGene's routed capsules (20 of width 64).
        zinb: weight of His2ST's ZINB likelihood of the raw counts in its loss (0.25;
            0 leaves it out).
        distill, distill_views: weight (0.5) of His2ST's self-distillation term and
            the augmented copies of the section it averages (5); 0 leaves it out.
        context_radius_um: each spot's frozen features pooled, distance-weighted, with
            those of the spots within this many µm (``mclx.training.context``); 0: the
            spot's own patch only.
        context_mode: how the radius joins them: ``mean`` replaces a spot's features by
            the weighted mean (itself included); ``concat`` appends the weighted mean of
            the OTHER spots within the radius to the spot's own features.
        context_fov_um: TRIPLEX's wider field of view: a second crop of this many µm a
            side around each spot, resized to ``patch_size`` and encoded by the same
            frozen encoder, its features appended to the spot's own (0: none). The
            model's feature input is ``[own, wide, neighbourhood]`` in that order
            (:func:`context_blocks`).
    """

    name: str = "mclstexp"
    encoder: str = "densenet121"
    n_genes: int = 785
    embed_dim: int = 256
    dropout: float = 0.1
    temperature: float = 1.0
    pos_embed: bool = True
    pos_size: tuple[int, int] = (64, 64)
    depth: int = 2
    heads: int = 8
    dim_head: int = 64
    context: Context = "batch"
    seq_len: int = 128
    k: int = 200
    distance: Distance = "l2"
    weighting: Weighting = "inverse_square"
    fusion_shared: bool = True
    mask_keep: float = 0.5
    feature_norm: bool = False
    graph_k: int = 4
    graph_radius: float = 0.0
    graph_depth: int = 4
    graph_heads: int = 8
    mixer_channels: int = 32
    mixer_kernel: int = 5
    mixer_patch: int = 7
    mixer_depth: int = 2
    capsules: int = 20
    capsule_dim: int = 64
    zinb: float = 0.0
    distill: float = 0.0
    distill_views: int = 5
    context_radius_um: float = 0.0
    context_mode: ContextMode = "mean"
    context_fov_um: float = 0.0


def context_blocks(cfg: Any) -> int:
    """How many encoder-width blocks a model's frozen feature input holds: the spot's
    own, the wide field of view's (``context_fov_um``), the neighbourhood's
    (``context_mode = "concat"`` with a radius), in that order."""
    fov = float(getattr(cfg, "context_fov_um", 0.0) or 0.0) > 0
    radius = float(getattr(cfg, "context_radius_um", 0.0) or 0.0) > 0
    concat = radius and getattr(cfg, "context_mode", "mean") == "concat"
    return 1 + int(fov) + int(concat)


@dataclass(frozen=True)
class TrainCfg:
    """Optimisation recipe; the defaults are mclSTExp's reference code's (each model's
    own: ``mclx.models.train_cfg``).

    Attributes:
        optimizer: ``adam`` (mclSTExp) or ``adamw`` (CMRCNet), with ``lr`` and
            ``weight_decay``.
        min_lr: None for a constant ``lr``; else cosine decay per epoch from ``lr`` to
            ``min_lr``, epoch ``e`` (from 0) at ``min_lr + (lr - min_lr)(1 + cos(pi (e +
            1) / epochs)) / 2`` as CMRCNet's scheduler, stepped before each epoch, gives.
        augment, augmentation: whether training patches are augmented, and how:
            ``mclstexp`` (ColorJitter 0.5, horizontal flip, rotation by up to 180°) or
            ``dihedral`` (horizontal and vertical flips, rotations by 90°; CMRCNet).
        lr_step, lr_gamma: with a constant ``lr`` (no ``min_lr``), multiply it by
            ``lr_gamma`` every ``lr_step`` epochs (PyTorch's StepLR per epoch: His2ST's
            50 and 0.9); 0 keeps it constant.
        val_fraction: hold out this fraction of the training spots and keep the weights
            of the epoch with the lowest loss on them (CMRCNet's checkpoint choice, 0.2
            there); 0 trains on every spot and keeps the last epoch.
        feature_views: with a frozen encoder, 1 caches each training patch's pooled
            features as cut; 8 caches those of its 8 dihedral views (rotations by 90°,
            with and without a flip) and each step draws one view per spot (the frozen
            counterpart of augmentation; validation and prediction read the patch as cut).
    """

    epochs: int = 90
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-3
    seed: int = 0
    freeze_encoder: bool = False
    augment: bool = True
    optimizer: Optimizer = "adam"
    min_lr: float | None = None
    augmentation: Augmentation = "mclstexp"
    val_fraction: float = 0.0
    feature_views: int = 1
    lr_step: int = 0
    lr_gamma: float = 1.0


def parse_fields(cls: type, items: Sequence[str], *, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """``["FIELD=VALUE", ...]`` -> ``{field: value}`` for scalar fields of dataclass
    ``cls`` but ``exclude`` (int, float, bool or str, converted by the field's default;
    ``mclx train --model-opt``). An unknown field or a value that does not convert is a
    ValueError."""
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in exclude}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        default = fields.get(key, dataclasses.MISSING)
        if not sep or isinstance(default, (tuple, type(None))) or default is dataclasses.MISSING:
            scalars = sorted(k for k, v in fields.items() if isinstance(v, (bool, int, float, str)))
            msg = f"{item!r}: not FIELD=VALUE with FIELD one of {', '.join(scalars)}"
            raise ValueError(msg)
        try:
            if isinstance(default, bool):
                value: Any = {"true": True, "1": True, "false": False, "0": False}[raw.lower()]
            else:
                value = type(default)(raw)
        except (KeyError, ValueError):
            msg = f"{item!r}: {raw!r} is not of type {type(default).__name__}"
            raise ValueError(msg) from None
        out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain dict of str/int/float/bool/list (safe for ``weights_only``)."""
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


# fields that earlier versions wrote and that no longer mean anything: dropped on reading
RETIRED = {"PreprocessCfg": {"pixel_scale"}, "TrainCfg": {"num_threads", "extra"}}


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Inverse of :func:`to_dict`; unknown keys are an error, tuples restored."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k not in RETIRED.get(cls.__name__, ())}
    unknown = set(data) - set(names)
    if unknown:
        msg = f"{cls.__name__}: unknown fields {sorted(unknown)}"
        raise ValueError(msg)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)
