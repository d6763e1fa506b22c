"""A model's two sides at inference, in PyTorch: image features and heads, spot embeddings.

- :func:`encode_features`: uint8 patches -> the image encoder's pooled features (N, F),
  which a frozen-encoder run caches once and trains on.
- :func:`head_outputs`: pooled features -> what the model predicts from an image: an
  embedding (contrastive models) or the expression itself (ST-Net; HisToGene from a
  whole section's features and positions).
- :func:`spot_embeddings`: a table of spots -> their embeddings (N, D), the keys of a bank.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from mclx.config import PreprocessCfg
from mclx.data.dataset import SpotTable
from mclx.inference.device import torch_device
from mclx.inference.transform import to_tensor


@torch.inference_mode()
def encode_features(
    encoder: nn.Module,
    patches: np.ndarray,
    pre: PreprocessCfg,
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    progress: bool = False,
    tokens: bool = False,
    desc: str = "encode",
) -> np.ndarray:
    """Pooled encoder features (N, F) float32 of uint8 patches, in eval mode; with
    ``tokens`` every token (N, T, F) (``forward_tokens``: a ViT's tokens, a feature
    map's positions). Float32 on every device (without TF32 on a GPU): the features a
    fold of ``mclx evaluate`` predicts from are the ones the FP32 runtime computes."""
    from tqdm.auto import tqdm

    from mclx.inference.encoders import no_tf32

    device = device or torch_device()
    encoder = encoder.to(device).eval().to(memory_format=torch.channels_last)
    out = []
    for start in tqdm(
        range(0, len(patches), batch_size), desc=desc, unit="batch", disable=not progress
    ):
        x = to_tensor(patches[start : start + batch_size], pre, device)
        with no_tf32() if device.type == "cuda" else contextlib.nullcontext():
            f = encoder.forward_tokens(x) if tokens else encoder(x)
        out.append(f.float().cpu().numpy())
    dim = getattr(encoder, "num_features", 0)
    return np.concatenate(out) if out else np.zeros((0, *([1] if tokens else []), dim), np.float32)


@torch.inference_mode()
def head_outputs(
    model: nn.Module, features: np.ndarray, *, positions: np.ndarray | None = None, device=None
) -> np.ndarray:
    """The model's head on pooled features: embeddings (contrastive) or expression
    (ST-Net; HisToGene, whose ``features`` are one whole section with its array
    ``positions``)."""
    device = device or torch_device()
    model.to(device).eval()
    f = torch.as_tensor(features, device=device)
    if model.kind == "section":
        if positions is None:
            msg = f"{model.cfg.name} predicts a whole section at once: it needs the positions"
            raise ValueError(msg)
        out = model.embed_image_features(f, torch.as_tensor(positions, device=device))
    else:
        out = model.embed_image_features(f)
    return out.float().cpu().numpy()


@torch.inference_mode()
def spot_embeddings(model: nn.Module, table: SpotTable, *, device=None) -> np.ndarray:
    """Spot embeddings (N, D) float32, each section encoded on its own.

    The attention sees what it saw in training: in ``batch`` context consecutive runs of
    ``model.cfg.seq_len`` spots of a section (the training batch size); in ``section``
    context the whole section.
    """
    device = device or torch_device()
    model.to(device).eval()
    out = np.zeros((len(table), model.cfg.embed_dim), np.float32)
    for s in table.sections:
        rows = table.rows(s)
        step = len(rows) if model.cfg.context == "section" else model.cfg.seq_len
        for start in range(0, len(rows), step):
            r = rows[start : start + step]
            e = model.embed_spots(
                torch.as_tensor(table.expr[r], device=device),
                torch.as_tensor(table.pos[r], device=device),
            )
            out[r] = e.float().cpu().numpy()
    return out
