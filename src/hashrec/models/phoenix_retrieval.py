"""Phoenix's retrieval two-tower (``recsys_retrieval_model.py``), op for op, on hashrec's pieces.

User tower: the ranker's user and history tokens (no dwell part), the causal Grok transformer
without a final norm, the mean of the valid tokens' outputs, L2-normalised (norm floored at
sqrt(1e-12)). Candidate tower: the post and author hash vectors, flattened, ``[(Kp+Ka)*D, 2D]``
-> SiLU -> ``[2D, D]``, L2-normalised the same way. Scores are dot products.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from hashrec.models.ranker import RankerConfig
from hashrec.nn.batch import RecsysBatch
from hashrec.nn.blocks import BlockHistoryReduce, BlockUserReduce
from hashrec.nn.table import FusedEmbeddingTable
from hashrec.nn.transformer import Transformer

__all__ = ["PhoenixRetrieval", "l2_normalize"]

EPS = 1e-12  # Phoenix: norm = sqrt(max(|x|^2, EPS))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] / sqrt(max(|x|^2, 1e-12)), as Phoenix."""
    return x / x.square().sum(-1, keepdim=True).clamp(min=EPS).sqrt()


class PhoenixRetrieval(nn.Module):
    """Phoenix's retrieval model: ``user(batch)`` -> [B, D], ``candidates(batch)`` -> [B, C, D].

    ``config`` is a ranker config (``RankerConfig.phoenix_mini``) for the shared shapes: hash
    layout, transformer, action count and surfaces; its heads, dwell and post-age parts are not
    used (Phoenix's retrieval model has none).

    >>> cfg = RankerConfig.phoenix_mini(dim=16, num_layers=1, num_heads=2, head_dim=8,
    ...                                 vocab_sizes={"user": 50, "post": 50, "author": 50})
    >>> model = PhoenixRetrieval(cfg)
    >>> rows = lambda e, *s: cfg.hash.rows_torch(e, torch.randint(1, 99, s))
    >>> batch = RecsysBatch(rows("user", 2), rows("post", 2, 3), rows("author", 2, 3),
    ...     torch.zeros(2, 3, 19), torch.zeros(2, 3, dtype=torch.long), rows("post", 2, 4),
    ...     rows("author", 2, 4), torch.zeros(2, 4, dtype=torch.long))
    >>> model.user(batch).shape, model.candidates(batch).shape
    (torch.Size([2, 16]), torch.Size([2, 4, 16]))
    """

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        self.config = config
        h, D = config.hash, config.dim
        Ku, Kp, Ka = (h[e].num_hashes for e in ("user", "post", "author"))
        self.table = FusedEmbeddingTable.from_config(h, D)
        self.user_reduce = BlockUserReduce(Ku, D)
        self.history_reduce = BlockHistoryReduce(Kp, Ka, D, config.num_actions, config.num_surfaces)
        self.transformer = Transformer(replace(config.transformer, final_norm=False))
        self.candidate_tower_projection_1 = nn.Parameter(
            torch.randn((Kp + Ka) * D, 2 * D) / ((Kp + Ka) * D) ** 0.5
        )
        self.candidate_tower_projection_2 = nn.Parameter(torch.randn(2 * D, D) / (2 * D) ** 0.5)
        self.register_buffer("log_temperature", torch.zeros(()))  # trained with it; unused here

    def user(self, batch: RecsysBatch) -> torch.Tensor:
        """Normalised user vectors [B, D] from the user and the history (candidates unused)."""
        c = self.config
        batch.validate(c.hash, num_actions=c.num_actions, num_surfaces=c.num_surfaces)
        emb = self.table.lookup(batch)
        user, user_mask = self.user_reduce(batch.user_hashes, emb.user_embeddings)
        hist, hist_mask = self.history_reduce(
            history_post_hashes=batch.history_post_hashes,
            history_post_embeddings=emb.history_post_embeddings,
            history_author_embeddings=emb.history_author_embeddings,
            history_product_surface=batch.history_product_surface,
            history_actions=batch.history_actions,
        )
        x = torch.cat([user, hist], dim=1)  # [B, 1+S, D]
        valid = torch.cat([user_mask, hist_mask], dim=1)  # [B, 1+S]
        out = self.transformer(x, valid, num_candidates=0)
        m = valid.to(out.dtype)[..., None]
        mean = (out * m).sum(1) / m.sum(1).clamp(min=1.0)
        return l2_normalize(mean)

    def candidates(self, batch: RecsysBatch) -> torch.Tensor:
        """Normalised candidate vectors [B, C, D] (padding candidates included)."""
        batch.validate(self.config.hash)
        emb = self.table.lookup(batch)
        B, C = batch.candidate_post_hashes.shape[:2]
        x = torch.cat([emb.candidate_post_embeddings, emb.candidate_author_embeddings], dim=2)
        x = x.reshape(B, C, -1).to(self.candidate_tower_projection_1.dtype)
        hidden = F.silu(x @ self.candidate_tower_projection_1)
        return l2_normalize(hidden @ self.candidate_tower_projection_2)
