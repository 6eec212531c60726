"""PhoenixRanker: fused hash table -> block reducers -> isolated transformer -> action heads.

``RecsysBatch`` in, per-candidate action logits out. The action list is configuration: Phoenix
predicts the 19 actions in ``ACTIONS`` (``dwell_time`` is continuous); a dataset declares its
own (KuaiRand's click, long_view, like, ...) and the heads follow it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hashrec.hashing.config import HashConfig
from hashrec.models.config import HashedModelConfig
from hashrec.nn.batch import RecsysBatch
from hashrec.nn.blocks import (
    NUM_PRODUCT_SURFACES,
    BlockCandidateReduce,
    BlockHistoryReduce,
    BlockUserReduce,
    padding_mask,
)
from hashrec.nn.layouts import lookup_layouts
from hashrec.nn.side import SideBatch, SideConfig, SideReduce
from hashrec.nn.table import FusedEmbeddingTable
from hashrec.nn.transformer import AttentionKernel, Transformer, TransformerConfig
from hashrec.nn.user_bias import UserBias

__all__ = [
    "ACTIONS",
    "PHOENIX_CONTINUOUS_ACTIONS",
    "POST_AGE_MAX_MINUTES",
    "PhoenixRanker",
    "RankerConfig",
    "RankerOutput",
    "post_age_bucket",
]

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
# Phoenix's ``continuous_unembeddings`` columns (runners.CONTINUOUS_ACTIONS, prefixed so they do
# not clash with the binary ``dwell_time`` head).
PHOENIX_CONTINUOUS_ACTIONS: tuple[str, ...] = tuple(
    "continuous_" + a
    for a in (
        "reserved",
        "dwell_time",
        "video_watch_time",
        "scroll_depth",
        "reserved_3",
        "reserved_4",
        "reserved_5",
        "reserved_6",
    )
)
POST_AGE_MAX_MINUTES = 4800  # Phoenix: ages beyond this share one overflow bucket


def post_age_bucket(
    impression_ts: torch.Tensor, creation_ts: torch.Tensor, granularity_mins: int
) -> torch.Tensor:
    """Phoenix's ``compute_post_age_bucket``: int seconds [...] -> bucket [...] (int64).

    0 = unknown (either timestamp 0, or created after the impression); 1 + age // granularity
    minutes otherwise, capped at the overflow bucket ``POST_AGE_MAX_MINUTES // g + 1``.

    >>> post_age_bucket(torch.tensor([7200, 7200, 0]), torch.tensor([3600, 9000, 5]), 60).tolist()
    [2, 0, 0]
    """
    overflow = POST_AGE_MAX_MINUTES // granularity_mins + 1
    age_min = torch.div(impression_ts - creation_ts, 60, rounding_mode="floor")
    bucket = (torch.div(age_min, granularity_mins, rounding_mode="floor") + 1).clamp(0, overflow)
    unknown = (age_min < 0) | (impression_ts == 0) | (creation_ts == 0)
    return torch.where(unknown, torch.zeros_like(bucket), bucket).long()


def _phoenix_binary_actions() -> tuple[str, ...]:
    return tuple(a for a in ACTIONS if a not in CONTINUOUS_ACTIONS)


@dataclass
class RankerConfig(HashedModelConfig):
    """Everything that shapes a ``PhoenixRanker``; stored in checkpoints as JSON.

    ``actions`` are the binary heads (and the history multi-hot); ``continuous_actions`` get a
    small non-negative regression head (``continuous_head="mlp"``) or Phoenix's linear
    ``continuous_unembeddings`` with a sigmoid (``"linear"``). The embedding width is
    ``transformer.dim``. ``history_dwell`` adds Phoenix's dwell-time token part (dwell seconds
    clipped to ``dwell_norm_scale``, scaled to [0, 1], 1 -> ``continuous_hidden`` -> D with a
    GELU); ``post_age_granularity_mins`` > 0 adds its candidate post-age embedding.
    ``RankerConfig.phoenix_mini()`` is X's released mini Phoenix, op for op. ``side``: how
    many side features the model takes (categorical fields hash into the ``feature`` entity of
    ``hash``). ``dropout``: on the input tokens and on the candidate outputs.
    ``user_bias_rows`` > 0 adds a per-user logit offset for ``user_bias_actions`` (every
    action when empty), ``gain`` and ``shrink`` as in ``hashrec.nn.user_bias.UserBias``.

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
    history_dwell: bool = False
    dwell_norm_scale: float = 30.0
    post_age_granularity_mins: int = 0
    continuous_head: Literal["mlp", "linear"] = "mlp"
    side: SideConfig = field(default_factory=SideConfig)
    dropout: float = 0.0
    user_bias_rows: int = 0
    user_bias_actions: tuple[str, ...] = ()
    user_bias_gain: float = 5.0
    user_bias_shrink: float = 0.5

    KIND: ClassVar[str] = "ranker"  # to_dict, from_dict, dim, num_actions: HashedModelConfig
    NESTED: ClassVar[dict[str, Callable[[dict], Any]]] = {"side": lambda d: SideConfig(**d)}

    def __post_init__(self) -> None:
        if isinstance(self.side, dict):
            self.side = SideConfig(**self.side)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if (self.side.user_fields or self.side.post_fields) and "feature" not in self.hash:
            names = [e.name for e in self.hash.entities]
            raise ValueError(
                f"side has categorical fields but hash has no 'feature' entity (it has {names})"
            )
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
        if self.continuous_head not in ("mlp", "linear"):
            raise ValueError(
                f"continuous_head must be 'mlp' or 'linear', got {self.continuous_head!r}"
            )
        if self.post_age_granularity_mins < 0:
            raise ValueError(
                f"post_age_granularity_mins must be >= 0, got {self.post_age_granularity_mins}"
            )
        if self.dwell_norm_scale <= 0:
            raise ValueError(f"dwell_norm_scale must be > 0, got {self.dwell_norm_scale}")
        self._check_user_bias()

    def _check_user_bias(self) -> None:
        rows, acts = self.user_bias_rows, self.user_bias_actions
        if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows < 2**31:
            raise ValueError(f"user_bias_rows must be an integer in [0, 2^31), got {rows!r}")
        if isinstance(acts, str) or not all(isinstance(a, str) for a in acts):
            raise ValueError(f"user_bias_actions must be a list of action names, got {acts!r}")
        self.user_bias_actions = acts = tuple(acts)
        if [a for a in acts if a not in self.actions] or len(set(acts)) != len(acts):
            raise ValueError(f"user_bias_actions must be distinct actions of {list(self.actions)}"
                             f", got {list(acts)}")  # fmt: skip
        if acts and not rows:
            raise ValueError(f"user_bias_actions {list(acts)} needs user_bias_rows > 0")
        for name, low in (("user_bias_gain", "> 0"), ("user_bias_shrink", ">= 0")):
            v = getattr(self, name)
            number = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not number or not (v > 0 if low == "> 0" else v >= 0):
                raise ValueError(f"{name} must be a finite number {low}, got {v!r}")

    @classmethod
    def phoenix_mini(
        cls,
        dim: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int = 32,
        vocab_sizes: dict[str, int] | None = None,
        num_hashes: int = 2,
        post_age_granularity_mins: int = 60,
        num_surfaces: int = NUM_PRODUCT_SURFACES,
    ) -> RankerConfig:
        """X's released mini Phoenix ranker (``phoenix/run_pipeline.py``'s model), op for op.

        Its transformer: causal context, rotary positions by slot (candidates too), q.k scaled
        by 0.125, tanh-approximate GELU, widening factor 2; 19 binary heads in Phoenix's order,
        8 linear continuous heads, history dwell and candidate post-age embeddings.

        >>> cfg = RankerConfig.phoenix_mini(dim=16, num_layers=1, num_heads=2, head_dim=8,
        ...                                 vocab_sizes={"user": 50, "post": 50, "author": 50})
        >>> cfg.num_actions, cfg.transformer.attn_scale, cfg.transformer.candidate_positions
        (19, 0.125, 'slots')
        """
        sizes = vocab_sizes or dict.fromkeys(("user", "post", "author"), 1_000_000)
        return cls(
            hash=HashConfig.sized(sizes, num_hashes=num_hashes, scheme="phoenix"),
            transformer=TransformerConfig(
                dim=dim,
                num_layers=num_layers,
                num_q_heads=num_heads,
                num_kv_heads=num_kv_heads or num_heads,
                head_dim=head_dim,
                widening_factor=2.0,
                attn_logit_cap=30.0,
                rope_base=10_000.0,
                causal=True,
                norm_eps=1e-5,
                attn_scale=0.125,
                candidate_positions="slots",
                gelu="tanh",
            ),
            actions=ACTIONS,
            continuous_actions=PHOENIX_CONTINUOUS_ACTIONS,
            num_surfaces=num_surfaces,
            continuous_hidden=64,
            history_dwell=True,
            dwell_norm_scale=30.0,
            post_age_granularity_mins=post_age_granularity_mins,
            continuous_head="linear",
        )

    @property
    def post_age_vocab_size(self) -> int:
        """Post-age buckets: unknown (0), ``4800 // g`` normal ones, one overflow; 0 if off."""
        g = self.post_age_granularity_mins
        return POST_AGE_MAX_MINUTES // g + 2 if g else 0


@dataclass
class RankerOutput:
    """logits [B, C, A] (binary actions), continuous [B, C, Ac] (>= 0), candidate_mask [B, C].

    >>> out = RankerOutput(torch.zeros(1, 2, 3), torch.zeros(1, 2, 0),
    ...                    torch.ones(1, 2, dtype=torch.bool))
    >>> out.probs[0, 0].tolist()  # sigmoid of the logits
    [0.5, 0.5, 0.5]
    """

    logits: torch.Tensor
    continuous: torch.Tensor
    candidate_mask: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


def reduce_valid_slots(
    reduce: nn.Module, args: dict[str, torch.Tensor], extra: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reduce`` (a block reducer, which works slot by slot) on the valid slots only.

    ``args`` are the reducer's [B, S, ...] keyword inputs, the first one the hashes whose
    padding marks the empty slots; ``extra`` its [B, S, D] extra parts. Returns tokens [B, S, D]
    (zeros at padding) and the mask [B, S], equal to ``reduce(**args, extra=extra)`` on every
    valid slot.
    """
    mask = padding_mask(next(iter(args.values())))  # [B, S]
    B, S = mask.shape
    index = mask.reshape(-1).nonzero().squeeze(1)  # [N]

    def pick(t: torch.Tensor) -> torch.Tensor:  # [B, S, ...] -> [1, N, ...]
        return t.reshape(B * S, *t.shape[2:]).index_select(0, index).unsqueeze(0)

    tokens, _ = reduce(**{k: pick(v) for k, v in args.items()}, extra=[pick(e) for e in extra])
    D = tokens.shape[-1]
    return tokens.new_zeros(B * S, D).index_copy(0, index, tokens[0]).view(B, S, D), mask


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
        self.history_reduce = BlockHistoryReduce(
            Kp, Ka, D, config.num_actions, config.num_surfaces, num_extra=int(config.history_dwell)
        )
        self.candidate_reduce = BlockCandidateReduce(
            Kp,
            Ka,
            D,
            self.history_reduce.product_surface_embedding_table,
            num_extra=int(config.post_age_granularity_mins > 0),
        )
        if config.history_dwell:  # Phoenix's _project_continuous_value_to_embedding
            H = config.continuous_hidden
            self.history_dwell_time_proj1 = nn.Parameter(torch.randn(1, H))
            self.history_dwell_time_proj2 = nn.Parameter(torch.randn(H, D) / H**0.5)
        if config.post_age_granularity_mins:
            self.post_age_embedding_table = nn.Embedding(config.post_age_vocab_size, D)
            nn.init.normal_(self.post_age_embedding_table.weight, std=D**-0.5)
        self.transformer = Transformer(config.transformer)
        self.unembeddings = nn.Parameter(torch.randn(D, config.num_actions) / D**0.5)
        Ac = len(config.continuous_actions)
        self.continuous_head: nn.Module | None = None
        if Ac and config.continuous_head == "linear":  # Phoenix: sigmoid(out @ [D, Ac])
            self.continuous_unembeddings = nn.Parameter(torch.randn(D, Ac) / D**0.5)
        elif Ac:
            self.continuous_head = nn.Sequential(
                nn.Linear(D, config.continuous_hidden),
                nn.GELU(),
                nn.Linear(config.continuous_hidden, Ac),
                nn.Softplus(),
            )
        sc = config.side
        Kf = h["feature"].num_hashes if (sc.user_fields or sc.post_fields) else 1
        self.user_side = (SideReduce(sc.user_fields, Kf, sc.user_numeric, D)
                          if sc.user_fields or sc.user_numeric else None)  # fmt: skip
        self.post_side = (SideReduce(sc.post_fields, Kf, sc.post_numeric, D)
                          if sc.post_fields or sc.post_numeric else None)  # fmt: skip
        self.history_signal_projection = (
            nn.Parameter(torch.randn(sc.history_signals, D) / sc.history_signals**0.5)
            if sc.history_signals
            else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.user_bias: UserBias | None = None
        if config.user_bias_rows:
            named = config.user_bias_actions or config.actions
            self.user_bias = UserBias(config.user_bias_rows,
                                      [config.actions.index(a) for a in named],
                                      config.num_actions, config.user_bias_gain,
                                      config.user_bias_shrink)  # fmt: skip

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the hash table (AdamW takes these; RowWiseAdagrad the table)."""
        return [p for n, p in self.named_parameters() if not n.startswith("table.")]

    @property
    def device(self) -> torch.device:
        return self.table.weight.device

    def forward(
        self,
        batch: RecsysBatch,
        kernel: AttentionKernel | None = None,
        side: SideBatch | None = None,
    ) -> RankerOutput:
        """Score every candidate of every request; ``kernel`` overrides the attention kernel;
        ``side``: the batch's side features (required when ``config.side`` declares any).

        The batch is checked against the config from the values it recorded when built (no
        host sync) and moved to the model's device if it is elsewhere; outputs stay there.
        """
        c = self.config
        if not batch.has_candidates:
            raise ValueError("the batch has no candidates: the ranker scores candidates")
        batch.validate(c.hash, num_actions=c.num_actions, num_surfaces=c.num_surfaces)
        if batch.user_hashes.device != self.device:
            batch = batch.to(self.device)
        if c.side.any and side is None:
            raise ValueError(f"the model takes side features ({c.side}); pass side=SideBatch")
        if side is not None and side.user_numeric.device != self.device:
            side = side.to(self.device)
        emb = lookup_layouts(c.hash, batch, self.table)
        user, user_mask = self.user_reduce(batch.user_hashes, emb.user_embeddings)
        hist_args = {
            "history_post_hashes": batch.history_post_hashes,
            "history_post_embeddings": emb.history_post_embeddings,
            "history_author_embeddings": emb.history_author_embeddings,
            "history_product_surface": batch.history_product_surface,
            "history_actions": batch.history_actions,
        }
        extra = [self._dwell_embedding(batch)] if c.history_dwell else []
        if self.pack_tokens:  # most history slots are padding: reduce the events only
            hist, hist_mask = reduce_valid_slots(self.history_reduce, hist_args, extra)
        else:
            hist, hist_mask = self.history_reduce(**hist_args, extra=extra)
        cand, cand_mask = self.candidate_reduce(
            batch.candidate_post_hashes,
            emb.candidate_post_embeddings,
            emb.candidate_author_embeddings,
            batch.candidate_product_surface,
            extra=[self._post_age_embedding(batch)] if c.post_age_granularity_mins else (),
        )
        if side is not None and c.side.any:
            user, hist, cand = self._add_side(side, user, hist, cand)
        x = torch.cat([user, hist, cand], dim=1)  # [B, 1+S+C, D]
        valid = torch.cat([user_mask, hist_mask, cand_mask], dim=1)  # [B, 1+S+C]
        C = cand.shape[1]
        out = self.transformer(x, valid, num_candidates=C, kernel=kernel,
                               input_dropout=self.dropout)[:, x.shape[1] - C :]  # fmt: skip
        out = self.dropout(out)
        logits = out @ self.unembeddings  # [B, C, A]
        if self.user_bias is not None:
            logits = logits + self.user_bias(batch.user_hashes)[:, None, :]
        if self.continuous_head is not None:
            continuous = self.continuous_head(out)
        elif c.continuous_actions and c.continuous_head == "linear":
            continuous = torch.sigmoid(out @ self.continuous_unembeddings)
        else:
            continuous = out.new_zeros(*out.shape[:2], 0)
        return RankerOutput(logits, continuous, cand_mask)

    @property
    def pack_tokens(self) -> bool:
        """Whether the history reducer and the transformer's token-wise work run on the valid
        tokens only (default True; ``Transformer.pack_tokens``). False: the padded reference
        path, equal on every valid token."""
        return self.transformer.pack_tokens

    @pack_tokens.setter
    def pack_tokens(self, value: bool) -> None:
        self.transformer.pack_tokens = bool(value)

    def _dwell_embedding(self, batch: RecsysBatch) -> torch.Tensor:
        """history_dwell [B, S] seconds (absent = 0) -> [B, S, D], as Phoenix: clip to the norm
        scale, divide by it, 1 -> H -> D with a GELU and no biases."""
        c = self.config
        w1 = self.history_dwell_time_proj1
        if batch.history_dwell is None:
            dwell = w1.new_zeros(batch.history_post_hashes.shape[:2])
        else:
            dwell = batch.history_dwell.to(w1.dtype)
        x = dwell.clamp(0.0, c.dwell_norm_scale) / c.dwell_norm_scale
        approximate = "tanh" if c.transformer.gelu == "tanh" else "none"
        return F.gelu(x[..., None] @ w1, approximate=approximate) @ self.history_dwell_time_proj2

    def _post_age_embedding(self, batch: RecsysBatch) -> torch.Tensor:
        """Candidate post-age bucket embeddings [B, C, D]; bucket 0 when timestamps are absent."""
        if batch.candidate_impression_ts is None:
            buckets = torch.zeros_like(batch.candidate_product_surface, dtype=torch.long)
        else:
            buckets = post_age_bucket(
                batch.candidate_impression_ts.long(),
                batch.candidate_creation_ts.long(),
                self.config.post_age_granularity_mins,
            )
        return self.post_age_embedding_table(buckets)

    def _add_side(
        self, side: SideBatch, user: torch.Tensor, hist: torch.Tensor, cand: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Side features added to the user [B, 1, D] (user fields), history [B, S, D] (event
        signals) and candidate [B, C, D] (post fields) tokens."""
        B, S, C = user.shape[0], hist.shape[1], cand.shape[1]
        side.validate(self.config.side, B, S, C)
        # one lookup for both: a sharded table applies its optimizer step once per lookup call,
        # so two calls would update a feature row hit by user and post fields twice
        rows = {
            name: getattr(side, field)
            for name, field, reduce in (("user", "user_feature_rows", self.user_side),
                                        ("post", "candidate_feature_rows", self.post_side))
            if reduce is not None
        }  # fmt: skip
        if rows:
            flat = self.table(torch.cat([r.reshape(-1) for r in rows.values()]))
            pieces = torch.split(flat, [r.numel() for r in rows.values()])
            D = self.table.dim
            emb = {n: p.view(*r.shape, D) for (n, r), p in zip(rows.items(), pieces, strict=True)}
            if "user" in emb:  # [B, Fu, K, D]
                user = user + self.user_side(emb["user"], side.user_numeric)[:, None]
            if "post" in emb:  # [B, C, Fp, K, D]
                cand = cand + self.post_side(emb["post"], side.candidate_numeric)
        if self.history_signal_projection is not None:
            sig = side.history_signals.to(self.history_signal_projection.dtype)
            hist = hist + sig @ self.history_signal_projection
        return user, hist, cand
