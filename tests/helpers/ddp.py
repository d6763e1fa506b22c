"""Data-parallel processes for tests/test_distributed.py: one contrastive step on a share
of a fixed global batch, in float64, with the loss and gradients written to a file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

GLOBAL_BATCH = 128
N_GENES, N_FEATS, POS = 24, 64, (12, 12)


def small_model(name: str):
    """A float64 mclSTExp (2 spot Transformer blocks, positions) or BLEEP, no dropout
    (its masks are drawn per process), seeded; its image encoder frozen, as training on
    cached features freezes it (DDP waits for the gradients of every trainable weight)."""
    from mclx.models import create_model, model_cfg

    torch.manual_seed(0)
    cfg = model_cfg(name, encoder="tiny_cnn", n_genes=N_GENES, pos_size=POS, embed_dim=32,
                    heads=2, dim_head=8, dropout=0.0)  # fmt: skip
    model = create_model(cfg, encoder_weights=None).double()
    model.image_encoder.requires_grad_(False)
    return model


def global_batch():
    """Cached image features, expressions and positions of one global batch."""
    g = np.random.default_rng(1)
    feats = torch.as_tensor(g.normal(size=(GLOBAL_BATCH, N_FEATS)))
    expr = torch.as_tensor(np.log1p(g.poisson(3.0, size=(GLOBAL_BATCH, N_GENES))).astype(float))
    pos = torch.as_tensor(g.integers(0, POS[0], size=(GLOBAL_BATCH, 2)))
    return feats, expr, pos


def trained_grads(model) -> dict[str, np.ndarray]:
    return {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()
            if p.grad is not None}  # fmt: skip


def step(rank: int, world_size: int, port: int, out: str) -> None:
    """Process ``rank`` of ``world_size`` (gloo): for each model, the global-negatives loss
    of its share and the gradients DDP leaves, saved to ``out/RANK.npz``."""
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from mclx.training import distributed

    w = distributed.from_env()
    feats, expr, pos = global_batch()
    rows = distributed.shard(np.arange(GLOBAL_BATCH), w)
    res = {}
    for name in ("mclstexp", "bleep"):
        model = small_model(name)
        ddp = distributed.wrap(model, w)
        loss = ddp(feats[rows], expr[rows], pos[rows], GLOBAL_BATCH)
        loss.backward()
        res[f"{name}/loss"] = loss.detach().numpy()
        res[f"{name}/local_negatives"] = model.loss(feats[rows], expr[rows], pos[rows]).detach()
        for k, v in trained_grads(model).items():
            res[f"{name}/grad/{k}"] = v
    np.savez(Path(out) / f"{rank}.npz", **res)
    distributed.shutdown()
