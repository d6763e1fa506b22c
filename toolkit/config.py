"""Configuration dataclasses. Each round-trips through a checkpoint as a plain dict.

- :class:`PreprocessCfg`: how counts become model inputs (genes, normalisation, log base)
  and how pixels become patches (patch size, µm/px, pixel scaling). Read by training,
  bank building, export and the runtime alike.
- :class:`ModelCfg`: architecture (which model, which image encoder, ablations).
- :class:`TrainCfg`: the optimisation recipe (defaults are the reference recipe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Context = Literal["batch", "section"]
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
    """

    genes: tuple[str, ...] = ()
    target_sum: float = 1e4
    log_base: LogBase = "10"
    patch_size: int = 224
    mpp: float | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class ModelCfg:
    """Architecture of one of the registered models.

    Attributes:
        name: a model of the registry (``mclx.models.MODELS``): ``mclstexp`` (the
            paper), ``bleep``, ``stnet``, ``cmrcnet`` or ``histogene`` (comparison methods).
        encoder: image encoder registry name (``densenet121`` by default).
        n_genes: number of genes G (spot encoder width, ST-Net output size).
        embed_dim: shared embedding size of the projection heads (HisToGene: the width of
            its Transformer over a section's patches).
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
            std of the training spots before the image projection (mclstexp, bleep; an
            ablation for badly conditioned random-init features). The statistics are
            buffers of the model, so export and inference apply them too.
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
