"""The spot graph and the graph layers of His2ST and THItoGene, in plain torch.

The graph is the one both references build (``calcADJ`` in github biomed-AI/Hist2ST and
yrjia1015/THItoGene): each spot is joined to its ``k`` nearest spots by Euclidean
distance between array coordinates (directed: row ``i`` holds ``i``'s neighbours; the
spot itself is not one), and His2ST's ``Grid`` pruning keeps only neighbours within
``radius`` (2.0 array units). The reference breaks distance ties by numpy's argsort
order; here ties go to the lower row index, so the graph is a function of the
positions and row order alone.

Everything is dense (N x N) torch ops - pairwise distances, ``topk``, masked softmax,
matrix products - so that the graph is computed inside the model from its ``positions``
input and exports to ONNX with a dynamic number of spots; sections of a few thousand
spots fit comfortably.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_FAR = 1e12  # "not a neighbour" distance (a spot and itself; squared distances are below)


def knn_adjacency(pos: torch.Tensor, k: int, radius: float = 0.0) -> torch.Tensor:
    """Boolean adjacency (N, N) of the ``k`` nearest spots of each spot.

    Args:
        pos: (N, 2) integer array coordinates (unique per spot).
        k: neighbours per spot (all other spots when the section has at most ``k``).
        radius: when > 0, a neighbour farther than this (array units) is dropped
            (His2ST's ``Grid`` pruning with 2.0); 0 keeps all ``k``.

    Returns:
        ``adj[i, j]``: spot ``j`` is a neighbour of spot ``i``.
    """
    if k < 1:
        msg = f"a spot graph needs k >= 1 neighbours, not {k}"
        raise ValueError(msg)
    p = pos.to(torch.float32)
    d2 = ((p.unsqueeze(1) - p.unsqueeze(0)) ** 2).sum(-1)
    # ties (equal integer squared distances) go to the lower column: + index / (2N) < 1
    col = torch.ones_like(p[:, 0]).cumsum(0) - 1
    ranked = d2 + col.unsqueeze(0) / (2 * (col.max() + 1))
    ranked = torch.where(d2 > 0, ranked, torch.full_like(ranked, _FAR))
    # k "far" columns so that topk(k) exists for any N (an exported graph's N varies):
    # in a section of at most k spots every other spot is a neighbour
    pad = torch.full_like(ranked[:, :1], _FAR).expand(-1, k)
    kth = torch.cat([ranked, pad], dim=1).topk(k, dim=1, largest=False).values[:, -1:]
    adj = (ranked <= kth) & (d2 > 0)
    if radius > 0:
        adj = adj & (d2 <= radius * radius)
    return adj


def mean_neighbours(x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
    """Each row's mean over its neighbours (N, D); a spot without neighbours gets 0
    (the reference divides by zero there and gives NaN)."""
    a = adj.to(x.dtype)
    return (a @ x) / a.sum(1, keepdim=True).clamp(min=1.0)


class MeanGraphLayer(nn.Module):
    """His2ST's GraphSAGE layer (``gs_block`` with ``gcn=True``, mean policy):
    ``normalize(relu(W mean_neighbours(x)))``, W without bias (Xavier uniform)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim_out, dim_in))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = F.relu(mean_neighbours(x, adj) @ self.weight.T)
        return F.normalize(h, p=2.0, dim=1)


class GATLayer(nn.Module):
    """One graph attention head (Velickovic et al. 2018, as THItoGene's
    ``GraphAttentionLayer``): ``e_ij = LeakyReLU(a1 . Wh_i + a2 . Wh_j)`` over the
    neighbours ``j`` of ``i``, softmax over ``j``, dropout on the attention, ``att @ Wh``,
    then ELU when ``concat``. Xavier uniform (gain 1.414) for ``W`` and ``a``."""

    def __init__(
        self, dim_in: int, dim_out: int, *, dropout: float, alpha: float, concat: bool
    ) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(dim_in, dim_out))
        self.a = nn.Parameter(torch.empty(2 * dim_out, 1))
        nn.init.xavier_uniform_(self.W, gain=1.414)
        nn.init.xavier_uniform_(self.a, gain=1.414)
        self.dim_out, self.dropout, self.alpha, self.concat = dim_out, dropout, alpha, concat

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        wh = h @ self.W
        e = wh @ self.a[: self.dim_out] + (wh @ self.a[self.dim_out :]).T
        e = F.leaky_relu(e, self.alpha)
        att = torch.where(adj, e, torch.full_like(e, -9e15)).softmax(dim=1)
        att = F.dropout(att, self.dropout, training=self.training)
        out = att @ wh
        return F.elu(out) if self.concat else out


class MultiHeadGAT(nn.Module):
    """THItoGene's two-layer GAT: dropout, ``heads`` concatenated ELU heads of width
    ``hidden``, dropout, one output head of width ``dim_out``, ELU."""

    def __init__(
        self, dim_in: int, hidden: int, dim_out: int, *, heads: int, dropout: float,
        alpha: float = 0.01,
    ) -> None:  # fmt: skip
        super().__init__()
        kw = {"dropout": dropout, "alpha": alpha}
        self.heads = nn.ModuleList(
            [GATLayer(dim_in, hidden, concat=True, **kw) for _ in range(heads)]
        )
        self.out = GATLayer(hidden * heads, dim_out, concat=False, **kw)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.dropout, training=self.training)
        x = torch.cat([head(x, adj) for head in self.heads], dim=1)
        x = F.dropout(x, self.dropout, training=self.training)
        return F.elu(self.out(x, adj))
