"""What a table layout does after the gather: importance weights of the ``weighted`` layout.

Lookup gathers ``num_slots`` rows per ID (``hashrec.hashing.layouts``). For ``multihash``,
``hybrid`` and ``qr`` those rows are the K vectors the reducers concatenate. For ``weighted`` the
last slot is an importance-weight row: G = D // K groups of K weights packed in D columns; the
ID's group is ``(sum of its K component rows) mod G``, and component j is scaled by ``1 + w_j``
(weights start near 0, so training starts as plain multi-hash). Everything stays in the one fused
parameter, so row-wise Adagrad updates the touched weight rows like any other row.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from hashrec.hashing.config import HashConfig
from hashrec.nn.batch import HASH_FIELDS, RecsysBatch, RecsysEmbeddings

__all__ = ["apply_layouts", "weighted_combine", "weighted_combine_reference"]


class _WeightedCombine(torch.autograd.Function):
    """out_j = v_j * (1 + w[cols_j]); backward writes both gradients into one [..., K+1, D]."""

    @staticmethod
    def forward(ctx, vectors: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        K = cols.shape[-1]
        comp = vectors[..., :K, :]
        scale = vectors[..., K, :].gather(-1, cols).add_(1.0)  # [..., K]
        ctx.save_for_backward(vectors, cols, scale)
        return comp * scale.unsqueeze(-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        vectors, cols, scale = ctx.saved_tensors
        K = cols.shape[-1]
        grad = torch.empty_like(vectors)
        torch.mul(g, scale.unsqueeze(-1), out=grad[..., :K, :])
        gw = torch.linalg.vecdot(g, vectors[..., :K, :])  # [..., K]: d out / d w_j
        grad[..., K, :].zero_().scatter_(-1, cols, gw)
        return grad, None


def weighted_combine(rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Importance-weighted components: rows [..., K+1] int, vectors [..., K+1, D] -> [..., K, D].

    >>> v = torch.ones(1, 3, 4)  # K = 2 components + 1 weight row of D = 4
    >>> weighted_combine(torch.tensor([[5, 6, 9]]), v).shape
    torch.Size([1, 2, 4])
    """
    K, D = rows.shape[-1] - 1, vectors.shape[-1]
    if K < 1 or D < K:
        raise ValueError(f"weighted layout needs 1 <= K <= D, got K={K}, D={D}")
    G = D // K
    group = rows[..., :K].sum(-1) % G  # [...]
    cols = group.unsqueeze(-1) * K + torch.arange(K, device=rows.device)  # [..., K]
    return _WeightedCombine.apply(vectors, cols)


def weighted_combine_reference(rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``weighted_combine`` one ID at a time (for tests)."""
    K, D = rows.shape[-1] - 1, vectors.shape[-1]
    G = D // K
    flat_r, flat_v = rows.reshape(-1, K + 1), vectors.reshape(-1, K + 1, D)
    out = []
    for r, v in zip(flat_r, flat_v, strict=True):
        g = int(sum(int(x) for x in r[:K])) % G
        out.append(torch.stack([v[j] * (1.0 + v[K, g * K + j]) for j in range(K)]))
    return torch.stack(out).reshape(*rows.shape[:-1], K, D)


def apply_layouts(
    config: HashConfig, batch: RecsysBatch, emb: RecsysEmbeddings
) -> RecsysEmbeddings:
    """Turn the gathered slots of every field into the K vectors per ID the reducers take."""
    if all(e.layout != "weighted" for e in config.entities):
        return emb
    out = {f.name: getattr(emb, f.name) for f in fields(emb)}
    for f in HASH_FIELDS:
        rows = getattr(batch, f.name)
        if rows is not None and config[f.entity].layout == "weighted":
            out[f.embedding] = weighted_combine(rows, out[f.embedding])
    return RecsysEmbeddings(**out)
