"""Typed containers passed into the model: hashed inputs and looked-up embeddings.

Field names and shapes follow Phoenix (``RecsysBatch`` / ``RecsysEmbeddings``). Glossary:
B batch, S history length, C candidates, K hashes per entity, D embedding width, A actions.
Index 0 means padding in every hash field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from hashrec.hashing.config import HashConfig

__all__ = ["RecsysBatch", "RecsysEmbeddings"]

_INT_DTYPES = (torch.int32, torch.int64)


def _tensor(name: str, value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray | list | tuple):
        return torch.as_tensor(np.asarray(value))
    raise ValueError(f"{name} must be a tensor or array, got {type(value).__name__}")


def _expect_shape(name: str, t: torch.Tensor, expected: tuple[int | None, ...], what: str) -> None:
    ok = t.dim() == len(expected) and all(
        e is None or e == a for e, a in zip(expected, t.shape, strict=True)
    )
    if not ok:
        exp = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {exp} ({what})")


def _expect_int(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}, expected torch.int32 or torch.int64")


def _expect_range(name: str, t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """Every element is 0 (padding) or within [lo, hi]."""
    if t.numel() == 0:
        return
    bad = (t != 0) & ((t < lo) | (t > hi))
    if bool(bad.any()):
        v = int(t[bad].reshape(-1)[0])
        raise ValueError(f"{name} holds {v}, expected 0 (padding) or {lo}..{hi} ({what})")


def _moved(obj, device: torch.device | str):
    out = object.__new__(type(obj))
    for f in fields(obj):
        object.__setattr__(out, f.name, getattr(obj, f.name).to(device))
    return out


@dataclass
class RecsysBatch:
    """Hashed inputs for one batch of requests (Phoenix field names).

    Hash fields hold rows of the fused table (or per-table indices for ``MultiHashEmbedding``).

    Shapes: user_hashes [B, Ku]; history_post_hashes [B, S, Kp]; history_author_hashes [B, S, Ka];
    history_actions [B, S, A] multi-hot (bool, int or float in [0, 1]); history_product_surface
    [B, S]; candidate_post_hashes [B, C, Kp]; candidate_author_hashes [B, C, Ka];
    candidate_product_surface [B, C].

    >>> import torch
    >>> b = RecsysBatch(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 3, 2, dtype=torch.long),
    ...     torch.ones(2, 3, 2, dtype=torch.long), torch.zeros(2, 3, 19),
    ...     torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, 2, dtype=torch.long),
    ...     torch.ones(2, 4, 2, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    >>> b.batch_size, b.history_len, b.num_candidates
    (2, 3, 4)
    """

    user_hashes: torch.Tensor
    history_post_hashes: torch.Tensor
    history_author_hashes: torch.Tensor
    history_actions: torch.Tensor
    history_product_surface: torch.Tensor
    candidate_post_hashes: torch.Tensor
    candidate_author_hashes: torch.Tensor
    candidate_product_surface: torch.Tensor

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _tensor(f.name, getattr(self, f.name)))
        self._check_structure()

    def _check_structure(self) -> None:
        for f in fields(self):
            if f.name != "history_actions":
                _expect_int(f.name, getattr(self, f.name))
        if self.user_hashes.dim() != 2:
            _expect_shape("user_hashes", self.user_hashes, (None, None), "[B, K]")
        B = self.user_hashes.shape[0]
        hp = self.history_post_hashes
        _expect_shape("history_post_hashes", hp, (B, None, None), "[B, S, K]")
        S = hp.shape[1]
        _expect_shape(
            "history_author_hashes", self.history_author_hashes, (B, S, None), "[B, S, K]"
        )
        _expect_shape("history_actions", self.history_actions, (B, S, None), "[B, S, A]")
        _expect_shape("history_product_surface", self.history_product_surface, (B, S), "[B, S]")
        cp = self.candidate_post_hashes
        _expect_shape("candidate_post_hashes", cp, (B, None, hp.shape[2]), "[B, C, Kp]")
        C = cp.shape[1]
        _expect_shape(
            "candidate_author_hashes",
            self.candidate_author_hashes,
            (B, C, self.history_author_hashes.shape[2]),
            "[B, C, Ka]",
        )
        _expect_shape("candidate_product_surface", self.candidate_product_surface, (B, C), "[B, C]")
        a = self.history_actions
        if a.dtype.is_complex:
            raise ValueError(f"history_actions has dtype {a.dtype}, expected bool, int or float")
        if a.numel() and a.dtype != torch.bool:
            lo, hi = float(a.min()), float(a.max())
            if lo < 0 or hi > 1:
                raise ValueError(
                    f"history_actions holds values in [{lo}, {hi}], expected multi-hot in [0, 1]"
                )
        for f in fields(self):
            t = getattr(self, f.name)
            if f.name != "history_actions" and t.numel() and int(t.min()) < 0:
                raise ValueError(f"{f.name} holds {int(t.min())}, expected indices >= 0")

    @property
    def batch_size(self) -> int:
        return self.user_hashes.shape[0]

    @property
    def history_len(self) -> int:
        return self.history_post_hashes.shape[1]

    @property
    def num_candidates(self) -> int:
        return self.candidate_post_hashes.shape[1]

    def validate(
        self,
        hash_config: HashConfig | None = None,
        num_actions: int | None = None,
        num_surfaces: int | None = None,
    ) -> RecsysBatch:
        """Check hash counts and index ranges against a configuration; returns self."""
        if num_actions is not None and self.history_actions.shape[2] != num_actions:
            raise ValueError(
                f"history_actions has {self.history_actions.shape[2]} actions, "
                f"config expects {num_actions}"
            )
        if num_surfaces is not None:
            for name in ("history_product_surface", "candidate_product_surface"):
                t = getattr(self, name)
                if t.numel() and int(t.max()) >= num_surfaces:
                    raise ValueError(
                        f"{name} holds {int(t.max())}, expected 0..{num_surfaces - 1} surfaces"
                    )
        if hash_config is not None:
            for name, entity in (
                ("user_hashes", "user"),
                ("history_post_hashes", "post"),
                ("candidate_post_hashes", "post"),
                ("history_author_hashes", "author"),
                ("candidate_author_hashes", "author"),
            ):
                t = getattr(self, name)
                k = hash_config[entity].num_hashes
                if t.shape[-1] != k:
                    raise ValueError(
                        f"{name} has {t.shape[-1]} hashes per {entity}, config expects {k}"
                    )
                lo, hi = hash_config.row_range(entity)
                _expect_range(name, t, lo, hi, f"rows of the {entity} block")
        return self

    def to(self, device: torch.device | str) -> RecsysBatch:
        """Move every field to ``device`` (already validated: no second check)."""
        return _moved(self, device)


@dataclass
class RecsysEmbeddings:
    """Looked-up hash vectors (Phoenix field names).

    Shapes: user_embeddings [B, Ku, D]; history_post_embeddings [B, S, Kp, D];
    candidate_post_embeddings [B, C, Kp, D]; history_author_embeddings [B, S, Ka, D];
    candidate_author_embeddings [B, C, Ka, D].
    """

    user_embeddings: torch.Tensor
    history_post_embeddings: torch.Tensor
    candidate_post_embeddings: torch.Tensor
    history_author_embeddings: torch.Tensor
    candidate_author_embeddings: torch.Tensor

    def __post_init__(self) -> None:
        for f in fields(self):
            t = _tensor(f.name, getattr(self, f.name))
            if not t.is_floating_point():
                raise ValueError(f"{f.name} has dtype {t.dtype}, expected a floating dtype")
            setattr(self, f.name, t)
        u = self.user_embeddings
        _expect_shape("user_embeddings", u, (None, None, None), "[B, K, D]")
        B, D = u.shape[0], u.shape[2]
        hp = self.history_post_embeddings
        _expect_shape("history_post_embeddings", hp, (B, None, None, D), "[B, S, K, D]")
        S, Kp = hp.shape[1], hp.shape[2]
        ha = self.history_author_embeddings
        _expect_shape("history_author_embeddings", ha, (B, S, None, D), "[B, S, K, D]")
        cp = self.candidate_post_embeddings
        _expect_shape("candidate_post_embeddings", cp, (B, None, Kp, D), "[B, C, Kp, D]")
        _expect_shape(
            "candidate_author_embeddings",
            self.candidate_author_embeddings,
            (B, cp.shape[1], ha.shape[2], D),
            "[B, C, Ka, D]",
        )

    def to(self, device: torch.device | str) -> RecsysEmbeddings:
        """Move every field to ``device`` (already validated: no second check)."""
        return _moved(self, device)
