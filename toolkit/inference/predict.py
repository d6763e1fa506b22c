"""Patches -> predicted expression: the one prediction path of evaluation and the runtime.

``predict(encoder, patches, bank)`` runs any :class:`~mclx.inference.encoders.Encoder`
over the patches in batches, then :func:`match` turns its outputs into expression: the
inverse-square-distance (or mean) weighted expression of the top-k bank spots by cosine
similarity for a contrastive model, the outputs themselves for a regression model
(ST-Net, no bank; HisToGene, which takes a whole section and its array coordinates at
once). The whole-slide runtime streams tiles through the same two steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_host(x: Any) -> np.ndarray:
    """A numpy array of ``x`` (CuPy arrays and torch tensors are copied from the GPU)."""
    if hasattr(x, "get"):  # CuPy
        return x.get()
    if type(x).__module__.startswith("torch"):  # a bank kept as torch CUDA tensors
        return x.detach().cpu().numpy()
    return np.asarray(x)


def match(outputs: Any, bank=None, *, k: int | None = None, distance: str | None = None):
    """Image outputs -> expression (same array type as ``outputs`` and the bank).

    Args:
        outputs: (N, D) embeddings, or (N, G) expression when ``bank`` is None.
        bank: a :class:`~mclx.bank.Bank` (numpy or device-resident); None for a
            regression model, whose outputs are the prediction.
        k, distance: retrieval settings; default the bank's.
    """
    if bank is None:
        return outputs
    from mclx.kernels import retrieve

    return retrieve(
        outputs,
        bank.embeddings,
        bank.expressions,
        bank.check_k(k),
        distance=distance or bank.distance,
        weighting=bank.weighting,
    )


def predict(
    encoder,
    patches: np.ndarray,
    bank=None,
    *,
    k: int | None = None,
    distance: str | None = None,
    batch_size: int = 64,
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """Predicted expression (N, G) float32 of uint8 patches (N, S, S, 3).

    The bank must come from the encoder's checkpoint and genes (checked first). With
    ``positions`` (N, 2), the array coordinates of a whole section, the patches go
    through the encoder together (a section-level model: HisToGene).
    """
    if bank is not None:
        bank.check_compatible(encoder.fingerprint, encoder.pre.genes)
        bank.check_k(k)
    if positions is not None:
        parts = [to_host(encoder(patches, positions))] if len(patches) else []
    else:
        parts = [
            to_host(encoder(patches[s : s + batch_size]))
            for s in range(0, len(patches), batch_size)
        ]
    if not parts:
        return np.zeros((0, len(encoder.pre.genes)), np.float32)
    return to_host(match(np.concatenate(parts), bank, k=k, distance=distance))
