"""The two-tower retriever of Phoenix: a user tower and a candidate tower over one fused table.

Both towers share what the ranker has: the hashing (``HashConfig``), the fused table, the block
reducers and the Grok-style ``Transformer`` (DESIGN §5).

* User tower: ``[user | history]`` tokens (``BlockUserReduce``, ``BlockHistoryReduce``) through
  the transformer with no candidates, mean-pooled over the valid tokens, L2-normalised.
* Candidate tower: the post and author hash vectors (row 0 is padding, so a missing author
  contributes zeros) concatenated, an MLP with SiLU, L2-normalised. No surface: a corpus post is
  embedded once, before anyone is served it.

Scores are cosine similarities; training divides them by a learned temperature
(``hashrec.models.losses.retrieval_loss``). A ``RecsysBatch``'s candidate fields are never read,
so a batch with no candidates (C = 0) is the natural input of the user tower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from hashrec.hashing.config import HashConfig
from hashrec.models.config import HashedModelConfig
from hashrec.nn.batch import RecsysBatch
from hashrec.nn.blocks import NUM_PRODUCT_SURFACES, BlockHistoryReduce, BlockUserReduce
from hashrec.nn.table import FusedEmbeddingTable, gather_rows
from hashrec.nn.transformer import Transformer, TransformerConfig

__all__ = ["TwoTowerConfig", "TwoTowerRetriever", "l2_normalise"]


def l2_normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x [..., D] -> x / max(||x||, eps): unit rows (an all-zero row stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


@dataclass
class TwoTowerConfig(HashedModelConfig):
    """Everything that shapes a ``TwoTowerRetriever``; stored in checkpoints as JSON.

    ``actions`` are the history multi-hot (the same list the ranker reads); ``candidate_hidden``
    0 means 2 x D; ``init_temperature`` starts the learned softmax temperature.

    >>> cfg = TwoTowerConfig(actions=("click", "long_view"))
    >>> cfg.dim, cfg.candidate_hidden
    (128, 256)
    """

    hash: HashConfig = field(default_factory=HashConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    actions: tuple[str, ...] = ("click",)
    num_surfaces: int = NUM_PRODUCT_SURFACES
    candidate_hidden: int = 0
    init_temperature: float = 0.05
    min_temperature: float = 0.01
    table_dtype: str = "float32"
    table_init_std: float = 0.05

    KIND: ClassVar[str] = "two-tower"  # to_dict, from_dict, dim, num_actions: HashedModelConfig

    def __post_init__(self) -> None:
        self.actions = tuple(self.actions)
        if not self.actions:
            raise ValueError("actions must name at least one history action")
        if len(set(self.actions)) != len(self.actions):
            raise ValueError(f"actions has duplicates: {self.actions}")
        if self.candidate_hidden == 0:
            self.candidate_hidden = 2 * self.transformer.dim
        if self.candidate_hidden < 1:
            raise ValueError(f"candidate_hidden must be >= 1, got {self.candidate_hidden}")
        if not 0 < self.min_temperature <= self.init_temperature:
            raise ValueError(
                f"need 0 < min_temperature <= init_temperature, got {self.min_temperature} and "
                f"{self.init_temperature}"
            )
        if self.table_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"table_dtype must be float32 or bfloat16, got {self.table_dtype!r}")


class TwoTowerRetriever(nn.Module):
    """User tower and candidate tower sharing one fused hash table.

    >>> cfg = TwoTowerConfig(hash=HashConfig.uniform(num_buckets=101),
    ...                      transformer=TransformerConfig(dim=16, num_layers=1, num_q_heads=2,
    ...                                                    num_kv_heads=1),
    ...                      actions=("click", "like"))
    >>> model = TwoTowerRetriever(cfg)
    >>> rows = lambda e, *s: cfg.hash.rows_torch(e, torch.randint(1, 99, s))
    >>> batch = RecsysBatch(rows("user", 2), rows("post", 2, 3), rows("author", 2, 3),
    ...     torch.zeros(2, 3, 2), torch.zeros(2, 3, dtype=torch.long))  # no candidates
    >>> u = model.embed_users(batch)                                # [B, D]
    >>> v = model.embed_candidates(rows("post", 5), rows("author", 5))  # [N, D]
    >>> (u @ v.T).shape, bool(torch.allclose(u.norm(dim=-1), torch.ones(2)))
    (torch.Size([2, 5]), True)
    """

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.config = config
        h, D = config.hash, config.dim
        Ku, Kp, Ka = (h[e].num_hashes for e in ("user", "post", "author"))
        self.num_post_hashes, self.num_author_hashes = Kp, Ka
        dtype = torch.bfloat16 if config.table_dtype == "bfloat16" else torch.float32
        self.table = FusedEmbeddingTable.from_config(
            h, D, dtype=dtype, init_std=config.table_init_std
        )
        self.user_reduce = BlockUserReduce(Ku, D)
        self.history_reduce = BlockHistoryReduce(Kp, Ka, D, config.num_actions, config.num_surfaces)
        self.transformer = Transformer(config.transformer)
        self.candidate_mlp = nn.Sequential(
            nn.Linear((Kp + Ka) * D, config.candidate_hidden),
            nn.SiLU(),
            nn.Linear(config.candidate_hidden, D),
        )
        # learned 1 / temperature, as CLIP: a log-scale parameter, clamped at use
        self.log_inverse_temperature = nn.Parameter(
            torch.tensor(math.log(1.0 / config.init_temperature))
        )

    @property
    def temperature(self) -> torch.Tensor:
        """The softmax temperature (scalar), never below ``config.min_temperature``."""
        max_log = math.log(1.0 / self.config.min_temperature)
        return torch.exp(-self.log_inverse_temperature.clamp(max=max_log))

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the hash table (AdamW takes these; RowWiseAdagrad the table)."""
        return [p for n, p in self.named_parameters() if not n.startswith("table.")]

    def _gather(self, **fields: torch.Tensor) -> list[torch.Tensor]:
        """Several named index tensors looked up with one gather (one sparse gradient)."""
        for name, idx in fields.items():
            self.table.check_indices(name, idx)
        indices = list(fields.values())
        flat = torch.cat([i.reshape(-1).to(torch.int64) for i in indices])
        out = gather_rows(self.table.weight, flat, self.table.sparse)
        pieces = torch.split(out, [i.numel() for i in indices])
        return [p.view(*i.shape, self.config.dim) for p, i in zip(pieces, indices, strict=True)]

    def embed_users(self, batch: RecsysBatch) -> torch.Tensor:
        """User tower: batch (candidates None or ignored) -> unit vectors [B, D].

        A request with neither a known user (hash 0) nor any history has no valid token; its
        vector is all zeros (it scores 0 against every post): callers route it to cold start.
        """
        c = self.config
        # checked against the config from the values the batch recorded when built (no sync)
        batch.validate(c.hash, num_actions=c.num_actions, num_surfaces=c.num_surfaces)
        if batch.user_hashes.device != self.table.weight.device:
            batch = batch.to(self.table.weight.device)
        emb = self.table.lookup(batch)  # candidates, if the batch has any, are not read
        user_emb = emb.user_embeddings
        post_emb, author_emb = emb.history_post_embeddings, emb.history_author_embeddings
        user, user_mask = self.user_reduce(batch.user_hashes, user_emb)
        hist, hist_mask = self.history_reduce(
            history_post_hashes=batch.history_post_hashes,
            history_post_embeddings=post_emb,
            history_author_embeddings=author_emb,
            history_product_surface=batch.history_product_surface,
            history_actions=batch.history_actions,
        )
        x = torch.cat([user, hist], dim=1)  # [B, 1+S, D]
        valid = torch.cat([user_mask, hist_mask], dim=1)  # [B, 1+S]
        out = self.transformer(x, valid, num_candidates=0)  # [B, 1+S, D]
        w = valid.to(out.dtype)[..., None]
        pooled = (out * w).sum(1) / w.sum(1).clamp(min=1.0)  # masked mean, [B, D]
        return l2_normalise(pooled.float())

    def embed_candidates(
        self, post_hashes: torch.Tensor, author_hashes: torch.Tensor
    ) -> torch.Tensor:
        """Candidate tower: post_hashes [..., Kp], author_hashes [..., Ka] -> unit [..., D]."""
        if post_hashes.shape[:-1] != author_hashes.shape[:-1]:
            raise ValueError(
                f"post_hashes {list(post_hashes.shape)} and author_hashes "
                f"{list(author_hashes.shape)} must agree on every dim but the last"
            )
        if post_hashes.shape[-1] != self.num_post_hashes:
            raise ValueError(
                f"post_hashes has {post_hashes.shape[-1]} hashes, config expects "
                f"{self.num_post_hashes}"
            )
        if author_hashes.shape[-1] != self.num_author_hashes:
            raise ValueError(
                f"author_hashes has {author_hashes.shape[-1]} hashes, config expects "
                f"{self.num_author_hashes}"
            )
        post, author = self._gather(post_hashes=post_hashes, author_hashes=author_hashes)
        lead = post_hashes.shape[:-1]
        x = torch.cat([post.reshape(*lead, -1), author.reshape(*lead, -1)], dim=-1)
        x = x.to(self.candidate_mlp[0].weight.dtype)  # [..., (Kp+Ka)*D]
        return l2_normalise(self.candidate_mlp(x).float())

    def forward(self, batch: RecsysBatch) -> torch.Tensor:
        """The user tower (``embed_users``): [B, D] unit vectors."""
        return self.embed_users(batch)

    @torch.no_grad()
    def embed_corpus(
        self, post_hashes: torch.Tensor, author_hashes: torch.Tensor, batch_size: int = 65_536
    ) -> torch.Tensor:
        """The whole corpus, N posts, in batches: [N, Kp], [N, Ka] -> [N, D] float32."""
        was = self.training
        self.eval()
        try:
            parts = [
                self.embed_candidates(
                    post_hashes[i : i + batch_size], author_hashes[i : i + batch_size]
                )
                for i in range(0, len(post_hashes), batch_size)
            ]
        finally:
            self.train(was)
        if not parts:
            return torch.zeros(0, self.config.dim)
        return torch.cat(parts)
