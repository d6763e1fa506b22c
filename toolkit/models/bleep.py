"""BLEEP (Xie et al. 2023): image and expression projection heads, soft-target CLIP loss.

No positional embeddings and no spot Transformer; retrieval averages the top 50 spots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bleep_loss(spot_emb: torch.Tensor, img_emb: torch.Tensor, temperature: float = 1.0):
    """BLEEP's loss: cross-entropy against ``softmax((S_img + S_spot) / 2 / T)`` targets."""
    logits = spot_emb @ img_emb.T / temperature
    img_sim = img_emb @ img_emb.T
    spot_sim = spot_emb @ spot_emb.T
    targets = F.softmax((img_sim + spot_sim) / 2 / temperature, dim=-1)
    spots_loss = (-targets * F.log_softmax(logits, dim=-1)).sum(1)
    images_loss = (-targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
    return ((spots_loss + images_loss) / 2).mean()
