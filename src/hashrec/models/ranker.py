"""PhoenixRanker: fused hash table -> block reducers -> isolated transformer -> action heads.

``RecsysBatch`` in, per-candidate action logits out. The action list is configuration: Phoenix
predicts the 19 actions in ``ACTIONS`` (``dwell_time`` is continuous); a dataset declares its
own (KuaiRand's click, long_view, like, ...) and the heads follow it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from hashrec.hashing.config import HashConfig
from hashrec.nn.batch import RecsysBatch
from hashrec.nn.blocks import (
    NUM_PRODUCT_SURFACES,
    BlockCandidateReduce,
    BlockHistoryReduce,
    BlockUserReduce,
)
from hashrec.nn.table import FusedEmbeddingTable
from hashrec.nn.transformer import AttentionKernel, Transformer, TransformerConfig

__all__ = ["ACTIONS", "PhoenixRanker", "RankerConfig", "RankerOutput"]

# Phoenix's action heads, in its order; dwell_time is the continuous one.
ACTIONS: tuple[str, ...] = (
    "favorite",
    "reply",
    "repost",
    "photo_expand",
    "click",
    "profile_click",
    "vqv",
    "share",
    "share_via_dm",
    "share_via_copy_link",
    "dwell",
    "quote",
    "quoted_click",
    "follow_author",
    "not_interested",
    "block_author",
    "mute_author",
    "report",
    "dwell_time",
)
CONTINUOUS_ACTIONS: tuple[str, ...] = ("dwell_time",)


def _phoenix_binary_actions() -> tuple[str, ...]:
    return tuple(a for a in ACTIONS if a not in CONTINUOUS_ACTIONS)


@dataclass
class RankerConfig:
    """Everything that shapes a ``PhoenixRanker``; stored in checkpoints as JSON.

    ``actions`` are the binary heads (and the history multi-hot); ``continuous_actions`` get a
    small non-negative regression head. The embedding width is ``transformer.dim``.

    >>> cfg = RankerConfig(actions=("click", "like"), continuous_actions=())
    >>> cfg.num_actions, cfg.dim
    (2, 128)
    """

    hash: HashConfig = field(default_factory=HashConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    actions: tuple[str, ...] = field(default_factory=_phoenix_binary_actions)
    continuous_actions: tuple[str, ...] = CONTINUOUS_ACTIONS
    num_surfaces: int = NUM_PRODUCT_SURFACES
    continuous_hidden: int = 64
    table_dtype: str = "float32"
    table_init_std: float = 0.05

    def __post_init__(self) -> None:
        self.actions = tuple(self.actions)
        self.continuous_actions = tuple(self.continuous_actions)
        if not self.actions:
            raise ValueError("actions must name at least one binary action")
        both = set(self.actions) & set(self.continuous_actions)
        if both:
            raise ValueError(f"actions {sorted(both)} are listed as binary and continuous")
        if len(set(self.actions)) != len(self.actions):
            raise ValueError(f"actions has duplicates: {self.actions}")
        if self.table_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"table_dtype must be float32 or bfloat16, got {self.table_dtype!r}")

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    @property
    def dim(self) -> int:
        return self.transformer.dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hash"] = self.hash.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RankerConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ranker config fields {sorted(unknown)}")
        return cls(
            **{
                **d,
                "hash": HashConfig.from_dict(d["hash"]),
                "transformer": TransformerConfig(**d["transformer"]),
            }
        )


@dataclass
class RankerOutput:
    """logits [B, C, A] (binary actions), continuous [B, C, Ac] (>= 0), candidate_mask [B, C]."""

    logits: torch.Tensor
    continuous: torch.Tensor
    candidate_mask: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


class PhoenixRanker(nn.Module):
    """The Phoenix ranking model over hashed inputs.

    >>> cfg = RankerConfig(hash=HashConfig.uniform(num_buckets=101),
    ...                    transformer=TransformerConfig(dim=16, num_layers=1, num_q_heads=2,
    ...                                                  num_kv_heads=1),
    ...                    actions=("click", "like"), continuous_actions=())
    >>> model = PhoenixRanker(cfg)
    >>> rows = lambda e, *s: cfg.hash.rows_torch(e, torch.randint(1, 99, s))
    >>> batch = RecsysBatch(rows("user", 2), rows("post", 2, 3), rows("author", 2, 3),
    ...     torch.zeros(2, 3, 2), torch.zeros(2, 3, dtype=torch.long), rows("post", 2, 4),
    ...     rows("author", 2, 4), torch.zeros(2, 4, dtype=torch.long))
    >>> model(batch).logits.shape
    torch.Size([2, 4, 2])
    """

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        self.config = config
        h, D = config.hash, config.dim
        Ku, Kp, Ka = (h[e].num_hashes for e in ("user", "post", "author"))
        dtype = torch.bfloat16 if config.table_dtype == "bfloat16" else torch.float32
        self.table = FusedEmbeddingTable.from_config(
            h, D, dtype=dtype, init_std=config.table_init_std
        )
        self.user_reduce = BlockUserReduce(Ku, D)
        self.history_reduce = BlockHistoryReduce(Kp, Ka, D, config.num_actions, config.num_surfaces)
        self.candidate_reduce = BlockCandidateReduce(
            Kp, Ka, D, self.history_reduce.product_surface_embedding_table
        )
        self.transformer = Transformer(config.transformer)
        self.unembeddings = nn.Parameter(torch.randn(D, config.num_actions) / D**0.5)
        self.continuous_head = (
            nn.Sequential(
                nn.Linear(D, config.continuous_hidden),
                nn.GELU(),
                nn.Linear(config.continuous_hidden, len(config.continuous_actions)),
                nn.Softplus(),
            )
            if config.continuous_actions
            else None
        )

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the hash table (AdamW takes these; RowWiseAdagrad the table)."""
        return [p for n, p in self.named_parameters() if not n.startswith("table.")]

    @property
    def device(self) -> torch.device:
        return self.table.weight.device

    def forward(self, batch: RecsysBatch, kernel: AttentionKernel | None = None) -> RankerOutput:
        """Score every candidate of every request; ``kernel`` overrides the attention kernel.

        The batch is checked against the config from the values it recorded when built (no
        host sync) and moved to the model's device if it is elsewhere; outputs stay there.
        """
        c = self.config
        if not batch.has_candidates:
            raise ValueError("the batch has no candidates: the ranker scores candidates")
        batch.validate(c.hash, num_actions=c.num_actions, num_surfaces=c.num_surfaces)
        if batch.user_hashes.device != self.device:
            batch = batch.to(self.device)
        emb = self.table.lookup(batch)
        user, user_mask = self.user_reduce(batch.user_hashes, emb.user_embeddings)
        hist, hist_mask = self.history_reduce(
            batch.history_post_hashes,
            emb.history_post_embeddings,
            emb.history_author_embeddings,
            batch.history_actions,
            batch.history_product_surface,
        )
        cand, cand_mask = self.candidate_reduce(
            batch.candidate_post_hashes,
            emb.candidate_post_embeddings,
            emb.candidate_author_embeddings,
            batch.candidate_product_surface,
        )
        x = torch.cat([user, hist, cand], dim=1)  # [B, 1+S+C, D]
        valid = torch.cat([user_mask, hist_mask, cand_mask], dim=1)  # [B, 1+S+C]
        C = cand.shape[1]
        out = self.transformer(x, valid, num_candidates=C, kernel=kernel)[:, x.shape[1] - C :]
        logits = out @ self.unembeddings  # [B, C, A]
        if self.continuous_head is not None:
            continuous = self.continuous_head(out)
        else:
            continuous = out.new_zeros(*out.shape[:2], 0)
        return RankerOutput(logits, continuous, cand_mask)
