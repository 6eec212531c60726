"""Typed containers passed into the model: hashed inputs and looked-up embeddings.

Field names and shapes follow Phoenix (``RecsysBatch`` / ``RecsysEmbeddings``). Glossary:
B batch, S history length, C candidates, K hashes per entity, D embedding width, A actions.
Index 0 means padding in every hash field.

The fields are declared once, in ``BATCH_FIELDS``: each with its symbolic shape, and for hash
fields the entity whose rows it holds and the ``RecsysEmbeddings`` field it becomes. Validation,
the table lookup and the data layer's collation all derive from that one list, so a new field
touches one place. Candidate fields are optional (None): the two-tower user tower scores no
candidates. The ``optional`` fields are the extra inputs of Phoenix's current model (history
dwell seconds, candidate impression/creation timestamps): None when absent, as in Phoenix.

Validation happens once, when a batch is built (in the data layer: collation time): shapes and
dtypes, then one pass over the values that records what a later check against a configuration
needs (per-field min/max rows, the largest surface). ``validate(config)`` and the model's
forward then compare those numbers without touching the tensors again: no host sync per forward.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from hashrec.hashing.config import HashConfig

__all__ = ["BATCH_FIELDS", "HASH_FIELDS", "BatchField", "RecsysBatch", "RecsysEmbeddings"]

_INT_DTYPES = (torch.int32, torch.int64)

Group = Literal["user", "history", "candidate"]


@dataclass(frozen=True)
class BatchField:
    """One field of ``RecsysBatch``: its symbolic shape and what it holds.

    ``kind`` is "hash" (fused-table rows of ``entity``, looked up into ``embedding``),
    "surface" (product-surface ids), "actions" (multi-hot history actions), "seconds" (float
    durations) or "timestamp" (int seconds). ``optional`` fields may be None on their own.

    >>> f = next(f for f in BATCH_FIELDS if f.name == "history_post_hashes")
    >>> f.entity, f.embedding, f.embedding_dims
    ('post', 'history_post_embeddings', ('B', 'S', 'Kp', 'D'))
    """

    name: str
    dims: tuple[str, ...]
    kind: Literal["hash", "surface", "actions", "seconds", "timestamp"]
    group: Group
    entity: str | None = None
    embedding: str | None = None
    optional: bool = False

    @property
    def embedding_dims(self) -> tuple[str, ...]:
        return (*self.dims, "D")


# The one definition of the batch. Order = RecsysBatch's field order = validation order.
# fmt: off
BATCH_FIELDS: tuple[BatchField, ...] = (
    BatchField("user_hashes", ("B", "Ku"), "hash", "user", "user", "user_embeddings"),
    BatchField("history_post_hashes", ("B", "S", "Kp"), "hash", "history", "post",
               "history_post_embeddings"),
    BatchField("history_author_hashes", ("B", "S", "Ka"), "hash", "history", "author",
               "history_author_embeddings"),
    BatchField("history_actions", ("B", "S", "A"), "actions", "history"),
    BatchField("history_product_surface", ("B", "S"), "surface", "history"),
    BatchField("candidate_post_hashes", ("B", "C", "Kp"), "hash", "candidate", "post",
               "candidate_post_embeddings"),
    BatchField("candidate_author_hashes", ("B", "C", "Ka"), "hash", "candidate", "author",
               "candidate_author_embeddings"),
    BatchField("candidate_product_surface", ("B", "C"), "surface", "candidate"),
    BatchField("history_dwell", ("B", "S"), "seconds", "history", optional=True),
    BatchField("candidate_impression_ts", ("B", "C"), "timestamp", "candidate", optional=True),
    BatchField("candidate_creation_ts", ("B", "C"), "timestamp", "candidate", optional=True),
)
# fmt: on
HASH_FIELDS: tuple[BatchField, ...] = tuple(f for f in BATCH_FIELDS if f.kind == "hash")
_CANDIDATE_FIELDS = tuple(f.name for f in BATCH_FIELDS if f.group == "candidate" and not f.optional)
_DIM_NAMES = {"Ku": "K", "Kp": "Kp", "Ka": "Ka"}  # how a dimension is spelled in messages


def _tensor(name: str, value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray | list | tuple):
        return torch.as_tensor(np.asarray(value))
    raise ValueError(f"{name} must be a tensor or array, got {type(value).__name__}")


class _Shapes:
    """Binds symbolic dimensions (B, S, ...) to sizes as fields are checked, in order."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    def check(self, name: str, t: torch.Tensor, dims: tuple[str, ...]) -> None:
        expected = tuple(self.sizes.get(d) for d in dims)
        ok = t.dim() == len(dims) and all(
            e is None or e == a for e, a in zip(expected, t.shape, strict=True)
        )
        if not ok:
            exp = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
            what = "[" + ", ".join(_DIM_NAMES.get(d, d) for d in dims) + "]"
            raise ValueError(f"{name} has shape {list(t.shape)}, expected {exp} ({what})")
        self.sizes.update(zip(dims, t.shape, strict=True))


def _moved(obj, device: torch.device | str):
    out = object.__new__(type(obj))
    out.__dict__.update(obj.__dict__)  # keeps the recorded value checks
    for f in fields(obj):
        t = getattr(obj, f.name)
        object.__setattr__(out, f.name, None if t is None else t.to(device))
    return out


@dataclass
class RecsysBatch:
    """Hashed inputs for one batch of requests (Phoenix field names).

    Hash fields hold rows of the fused table (or per-table indices for ``MultiHashEmbedding``).

    Shapes: user_hashes [B, Ku]; history_post_hashes [B, S, Kp]; history_author_hashes [B, S, Ka];
    history_actions [B, S, A] multi-hot (bool, int or float in [0, 1]); history_product_surface
    [B, S]; candidate_post_hashes [B, C, Kp]; candidate_author_hashes [B, C, Ka];
    candidate_product_surface [B, C]. The three candidate fields may all be None (no candidates).
    Optional (None = absent, as in Phoenix): history_dwell [B, S] float seconds;
    candidate_impression_ts and candidate_creation_ts [B, C] int seconds (post age; 0 = unknown),
    given together.

    >>> import torch
    >>> b = RecsysBatch(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 3, 2, dtype=torch.long),
    ...     torch.ones(2, 3, 2, dtype=torch.long), torch.zeros(2, 3, 19),
    ...     torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, 2, dtype=torch.long),
    ...     torch.ones(2, 4, 2, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    >>> b.batch_size, b.history_len, b.num_candidates
    (2, 3, 4)
    >>> RecsysBatch(b.user_hashes, b.history_post_hashes, b.history_author_hashes,
    ...     b.history_actions, b.history_product_surface).num_candidates  # user tower input
    0
    """

    user_hashes: torch.Tensor
    history_post_hashes: torch.Tensor
    history_author_hashes: torch.Tensor
    history_actions: torch.Tensor
    history_product_surface: torch.Tensor
    candidate_post_hashes: torch.Tensor | None = None
    candidate_author_hashes: torch.Tensor | None = None
    candidate_product_surface: torch.Tensor | None = None
    history_dwell: torch.Tensor | None = None
    candidate_impression_ts: torch.Tensor | None = None
    candidate_creation_ts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        present = [getattr(self, n) is not None for n in _CANDIDATE_FIELDS]
        if any(present) and not all(present):
            missing = [n for n, p in zip(_CANDIDATE_FIELDS, present, strict=True) if not p]
            raise ValueError(f"{missing} are None: give all three candidate fields or none")
        if (self.candidate_impression_ts is None) != (self.candidate_creation_ts is None):
            raise ValueError(
                "candidate_impression_ts and candidate_creation_ts must be given together"
            )
        if self.candidate_impression_ts is not None and not all(present):
            raise ValueError("candidate timestamps are given but the candidate fields are None")
        shapes = _Shapes()
        for f in BATCH_FIELDS:
            value = getattr(self, f.name)
            if value is None:
                continue
            t = _tensor(f.name, value)
            setattr(self, f.name, t)
            if f.kind == "actions":
                if t.dtype.is_complex:
                    raise ValueError(f"{f.name} has dtype {t.dtype}, expected bool, int or float")
            elif f.kind == "seconds":
                if not t.is_floating_point():
                    raise ValueError(f"{f.name} has dtype {t.dtype}, expected a floating dtype")
            elif t.dtype not in _INT_DTYPES:
                raise ValueError(
                    f"{f.name} has dtype {t.dtype}, expected torch.int32 or torch.int64"
                )
            shapes.check(f.name, t, f.dims)
        self._record_values()

    def _record_values(self) -> None:
        """One pass over the values: reject what no configuration accepts, record the rest."""
        a = self.history_actions
        if a.numel() and a.dtype != torch.bool:
            af = a.float()
            if not bool(torch.isfinite(af).all()):
                raise ValueError("history_actions holds NaN or infinite values, expected 0..1")
            lo, hi = float(af.min()), float(af.max())
            if lo < 0 or hi > 1:
                raise ValueError(
                    f"history_actions holds values in [{lo}, {hi}], expected multi-hot in [0, 1]"
                )
        # field -> (smallest non-zero value, largest value); None when all padding / empty
        self._ranges: dict[str, tuple[int, int] | None] = {}
        for f in BATCH_FIELDS:
            t = getattr(self, f.name)
            if f.kind in ("actions", "seconds") or t is None:
                continue
            if t.numel() and int(t.min()) < 0:
                raise ValueError(f"{f.name} holds {int(t.min())}, expected indices >= 0")
            nonzero = t[t != 0]
            self._ranges[f.name] = (
                (int(nonzero.min()), int(nonzero.max())) if nonzero.numel() else None
            )

    @property
    def batch_size(self) -> int:
        return self.user_hashes.shape[0]

    @property
    def history_len(self) -> int:
        return self.history_post_hashes.shape[1]

    @property
    def num_candidates(self) -> int:
        c = self.candidate_post_hashes
        return 0 if c is None else c.shape[1]

    @property
    def has_candidates(self) -> bool:
        return self.candidate_post_hashes is not None

    def validate(
        self,
        hash_config: HashConfig | None = None,
        num_actions: int | None = None,
        num_surfaces: int | None = None,
    ) -> RecsysBatch:
        """Check hash counts and index ranges against a configuration; returns self.

        Uses the values recorded when the batch was built: no pass over the tensors.
        """
        if num_actions is not None and self.history_actions.shape[2] != num_actions:
            raise ValueError(
                f"history_actions has {self.history_actions.shape[2]} actions, "
                f"config expects {num_actions}"
            )
        for f in BATCH_FIELDS:
            rng = self._ranges.get(f.name)
            if rng is None:
                continue
            if f.kind == "surface" and num_surfaces is not None and rng[1] >= num_surfaces:
                raise ValueError(
                    f"{f.name} holds {rng[1]}, expected 0..{num_surfaces - 1} surfaces"
                )
            if f.kind == "hash" and hash_config is not None:
                t = getattr(self, f.name)
                k = hash_config[f.entity].num_slots
                if t.shape[-1] != k:
                    raise ValueError(
                        f"{f.name} has {t.shape[-1]} hashes per {f.entity}, config expects {k}"
                    )
                lo, hi = hash_config.row_range(f.entity)
                bad = rng[0] if rng[0] < lo else rng[1] if rng[1] > hi else None
                if bad is not None:
                    raise ValueError(
                        f"{f.name} holds {bad}, expected 0 (padding) or {lo}..{hi} "
                        f"(rows of the {f.entity} block)"
                    )
        return self

    def max_index(self, names: tuple[str, ...] | None = None) -> int:
        """Largest value in the given hash fields (default: all), from the recorded values."""
        names = names or tuple(f.name for f in HASH_FIELDS)
        return max((r[1] for n in names if (r := self._ranges.get(n)) is not None), default=0)

    def to(self, device: torch.device | str) -> RecsysBatch:
        """Move every field to ``device`` (already validated: no second check)."""
        return _moved(self, device)


@dataclass
class RecsysEmbeddings:
    """Looked-up hash vectors (Phoenix field names); each is its hash field's shape plus D.

    Shapes: user_embeddings [B, Ku, D]; history_post_embeddings [B, S, Kp, D];
    candidate_post_embeddings [B, C, Kp, D]; history_author_embeddings [B, S, Ka, D];
    candidate_author_embeddings [B, C, Ka, D]. Candidate fields are None for a batch without
    candidates.

    >>> e = RecsysEmbeddings(torch.zeros(2, 2, 8), torch.zeros(2, 3, 2, 8), None,
    ...                      torch.zeros(2, 3, 1, 8), None)
    >>> e.history_author_embeddings.shape
    torch.Size([2, 3, 1, 8])
    """

    user_embeddings: torch.Tensor
    history_post_embeddings: torch.Tensor
    candidate_post_embeddings: torch.Tensor | None
    history_author_embeddings: torch.Tensor
    candidate_author_embeddings: torch.Tensor | None

    def __post_init__(self) -> None:
        shapes = _Shapes()
        for f in HASH_FIELDS:
            value = getattr(self, f.embedding)
            if value is None:
                if f.group != "candidate":
                    raise ValueError(f"{f.embedding} is None, expected a tensor")
                continue
            t = _tensor(f.embedding, value)
            if not t.is_floating_point():
                raise ValueError(f"{f.embedding} has dtype {t.dtype}, expected a floating dtype")
            setattr(self, f.embedding, t)
            shapes.check(f.embedding, t, f.embedding_dims)
        if (self.candidate_post_embeddings is None) != (self.candidate_author_embeddings is None):
            raise ValueError("give both candidate embeddings or neither")

    def to(self, device: torch.device | str) -> RecsysEmbeddings:
        """Move every field to ``device`` (already validated: no second check)."""
        return _moved(self, device)
