"""BLEEP (Xie et al. 2023): image and expression projection heads, soft-target CLIP loss.

No positional embeddings and no spot Transformer; retrieval averages the top 50 spots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bleep_loss(
    spot_emb: torch.Tensor,
    img_emb: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "mean",
):
    """BLEEP's soft-target loss: logits ``spot @ img.T / T``, targets
    ``softmax((img @ img.T + spot @ spot.T) / 2 / T)`` by row, cross-entropy of the rows
    and of the columns, averaged: per spot with ``reduction="none"`` (CMRCNet takes
    ``log(1 + .)`` of each), else their mean."""
    logits = spot_emb @ img_emb.T / temperature
    img_sim = img_emb @ img_emb.T
    spot_sim = spot_emb @ spot_emb.T
    targets = F.softmax((img_sim + spot_sim) / 2 / temperature, dim=-1)
    spots_loss = (-targets * F.log_softmax(logits, dim=-1)).sum(1)
    images_loss = (-targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
    per_spot = (spots_loss + images_loss) / 2
    return per_spot if reduction == "none" else per_spot.mean()
