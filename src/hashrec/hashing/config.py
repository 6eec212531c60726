"""Hash configuration: per entity type, how IDs hash, and where each type lives in the fused table.

Layout of the fused table (as Phoenix's ``HashTable``): row 0 is padding, rows 1 .. reserved_rows
are reserved, then one contiguous block of ``num_buckets`` rows per entity type in declaration
order. Hash value h (1 .. N-1) of an entity maps to row ``offset + h``; 0 stays 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from hashrec.hashing.functions import (
    default_hash,
    default_hash_torch,
    phoenix_hash,
    phoenix_hash_torch,
)
from hashrec.hashing.layouts import LAYOUTS, Layout, local_indices

__all__ = ["PHOENIX_ENTITIES", "EntityHash", "HashConfig"]

Scheme = Literal["phoenix", "default"]


@dataclass(frozen=True)
class EntityHash:
    """How one entity type hashes: k functions into N buckets, laid out by ``layout``.

    ``layout`` (``hashrec.hashing.layouts``): ``multihash`` (Phoenix, the default), ``hybrid``
    (``head_ids`` own private rows), ``qr`` (``extra_rows`` quotient rows) or ``weighted``
    (``extra_rows`` importance-weight rows). The block holds ``block_rows`` = N + extra rows.

    >>> EntityHash("post", num_hashes=2, num_buckets=1000).hash([0, 42]).shape
    (2, 2)
    >>> hybrid = EntityHash("post", 2, 1000, layout="hybrid", head_ids=(42,))
    >>> hybrid.local([0, 42]).tolist(), hybrid.block_rows
    ([[0, 0], [1000, 1000]], 1001)
    """

    name: str
    num_hashes: int = 2
    num_buckets: int = 100_000
    scheme: Scheme = "default"
    scales: tuple[int, ...] = ()
    biases: tuple[int, ...] = ()
    modulus: int = 0
    seed: int = 0
    layout: Layout = "multihash"
    head_ids: tuple[int, ...] = ()
    extra_rows: int = 0

    def __post_init__(self) -> None:
        self._check_layout()
        if self.num_hashes < 1:
            raise ValueError(f"{self.name}: num_hashes must be >= 1, got {self.num_hashes}")
        if self.num_buckets < 2:
            raise ValueError(f"{self.name}: num_buckets must be >= 2, got {self.num_buckets}")
        if self.scheme == "phoenix":
            if len(self.scales) < self.num_hashes or len(self.biases) < self.num_hashes:
                raise ValueError(
                    f"{self.name}: the phoenix scheme needs {self.num_hashes} scales and biases, "
                    f"got {len(self.scales)} and {len(self.biases)}"
                )
            if not 1 <= self.modulus < 2**32:
                raise ValueError(f"{self.name}: modulus must be in [1, 2^32), got {self.modulus}")
        elif self.scheme == "identity":
            if self.num_hashes != 1:
                raise ValueError(
                    f"{self.name}: the identity scheme has one hash, got {self.num_hashes}"
                )
        elif self.scheme != "default":
            raise ValueError(
                f"{self.name}: scheme must be 'phoenix', 'default' or 'identity', "
                f"got {self.scheme!r}"
            )

    def _check_layout(self) -> None:
        n, lay = self.name, self.layout
        if lay not in LAYOUTS:
            raise ValueError(f"{n}: layout must be one of {LAYOUTS}, got {lay!r}")
        if lay != "multihash" and self.scheme == "identity":
            raise ValueError(f"{n}: the identity scheme has no {lay} layout (it needs none)")
        if lay != "hybrid" and self.head_ids:
            raise ValueError(f"{n}: head_ids are for the hybrid layout, got layout {lay!r}")
        if lay == "hybrid":
            object.__setattr__(self, "head_ids", tuple(int(i) for i in self.head_ids))
            head = np.asarray(self.head_ids, dtype=np.int64)
            if len(head) and (head[0] == 0 or not (head[1:] > head[:-1]).all()):
                raise ValueError(f"{n}: head_ids must be sorted, unique and non-zero")
            if head.min(initial=1) == 0:
                raise ValueError(f"{n}: head_ids must not hold 0 (padding)")
        if lay in ("qr", "weighted") and self.extra_rows < 1:
            raise ValueError(f"{n}: the {lay} layout needs extra_rows >= 1, got {self.extra_rows}")
        if lay in ("multihash", "hybrid") and self.extra_rows:
            raise ValueError(f"{n}: extra_rows is for qr/weighted, got {self.extra_rows} ({lay})")
        if lay == "qr" and self.num_hashes != 2:
            raise ValueError(
                f"{n}: the qr layout has 2 slots (num_hashes=2), got {self.num_hashes}"
            )

    @property
    def block_rows(self) -> int:
        """Rows of this entity's block: N hashed rows (local 0 unused) + the layout's extra."""
        return self.num_buckets + len(self.head_ids) + self.extra_rows

    @property
    def num_slots(self) -> int:
        """Indices per ID in a batch: k, plus the importance-weight row of ``weighted``."""
        return self.num_hashes + (self.layout == "weighted")

    @cached_property
    def head_array(self) -> np.ndarray:
        """``head_ids`` as a sorted int64 array (the hybrid's frequency map)."""
        return np.asarray(self.head_ids, dtype=np.int64)

    def local(self, ids: np.ndarray | list) -> np.ndarray:
        """Block-local indices under the layout, int64 ``ids.shape + (num_slots,)``."""
        return local_indices(self, ids)

    def hash(self, ids: np.ndarray | list) -> np.ndarray:
        """Block-local hashes (0 = padding, else 1 .. N-1), int64 ``ids.shape + (k,)``."""
        if self.scheme == "identity":  # dense IDs 1..N-1 own their row: no collisions
            x = np.asarray(ids, dtype=np.int64)
            self._check_identity(int(x.min(initial=0)), int(x.max(initial=0)))
            return x[..., None].copy()
        if self.scheme == "phoenix":
            k = self.num_hashes
            return phoenix_hash(
                np.asarray(ids), self.scales[:k], self.biases[:k], self.modulus, self.num_buckets
            )
        return default_hash(ids, self.num_hashes, self.num_buckets, self.seed)

    def _check_identity(self, lo: int, hi: int) -> None:
        if lo < 0 or hi >= self.num_buckets:
            raise ValueError(
                f"{self.name}: identity scheme needs IDs in 0..{self.num_buckets - 1}, "
                f"got {lo}..{hi}"
            )

    def hash_torch(self, ids: torch.Tensor) -> torch.Tensor:
        """``hash`` for int64 tensors on any device."""
        if self.scheme == "identity":
            x = ids.to(torch.int64)
            if x.numel():
                self._check_identity(int(x.min()), int(x.max()))
            return x[..., None].clone()
        if self.scheme == "phoenix":
            k = self.num_hashes
            return phoenix_hash_torch(
                ids, self.scales[:k], self.biases[:k], self.modulus, self.num_buckets
            )
        return default_hash_torch(ids, self.num_hashes, self.num_buckets, self.seed)


# X's published constants and table sizes (phoenix/xrex/models/recsys_embedding.py, HashKeys).
PHOENIX_ENTITIES: dict[str, EntityHash] = {
    "user": EntityHash(
        "user", 2, 100_000, "phoenix", (196742702, 1852108266), (1935840681, 167407236), 2859568897
    ),
    "post": EntityHash(
        "post", 2, 100_000, "phoenix", (2161410491, 1754358832), (1935840681, 167407236), 2361375383
    ),
    "author": EntityHash(
        "author", 2, 10_000, "phoenix", (371965780, 328930218), (139686260, 37755056), 631860353
    ),
}


def _default_entities() -> tuple[EntityHash, ...]:
    return (
        EntityHash("user", seed=1),
        EntityHash("post", seed=2),
        EntityHash("author", num_buckets=10_000, seed=3),
    )


@dataclass(frozen=True)
class HashConfig:
    """Entity hash specs plus the fused-table layout (offsets of each block).

    >>> cfg = HashConfig.phoenix()
    >>> cfg.offset("user"), cfg.offset("post"), cfg.num_rows
    (65, 100065, 210065)
    >>> cfg.rows("post", [0, 123]).tolist()[0]
    [0, 0]
    """

    entities: tuple[EntityHash, ...] = field(default_factory=_default_entities)
    reserved_rows: int = 64

    def __post_init__(self) -> None:
        names = [e.name for e in self.entities]
        if len(set(names)) != len(names):
            raise ValueError(f"entity names must be unique, got {names}")
        for required in ("user", "post", "author"):
            if required not in names:
                raise ValueError(f"HashConfig needs a '{required}' entity, got {names}")
        if self.reserved_rows < 0:
            raise ValueError(f"reserved_rows must be >= 0, got {self.reserved_rows}")

    @classmethod
    def phoenix(cls, **sizes: int) -> HashConfig:
        """X's constants; override table sizes by name, e.g. ``phoenix(post=1_000_000)``."""
        unknown = set(sizes) - set(PHOENIX_ENTITIES)
        if unknown:
            raise ValueError(f"unknown entity {sorted(unknown)}, expected {list(PHOENIX_ENTITIES)}")
        ents = []
        for name, ent in PHOENIX_ENTITIES.items():
            if name in sizes:
                ent = replace(ent, num_buckets=sizes[name])
            ents.append(ent)
        return cls(entities=tuple(ents))

    @classmethod
    def uniform(
        cls, num_buckets: int, num_hashes: int = 2, scheme: Scheme = "default", seed: int = 0
    ) -> HashConfig:
        """Same k and N for user, post and author (the phoenix scheme keeps X's constants)."""
        sizes = dict.fromkeys(("user", "post", "author"), num_buckets)
        return cls.sized(sizes, num_hashes, scheme, seed)

    @classmethod
    def sized(
        cls, buckets: dict[str, int], num_hashes: int = 2, scheme: Scheme = "default", seed: int = 0
    ) -> HashConfig:
        """k hashes per entity, N from ``buckets`` (user, post, author); the default scheme
        seeds entity i with ``seed + i``, the phoenix scheme keeps X's constants."""
        ents = []
        for i, (name, num_buckets) in enumerate(buckets.items()):
            if scheme == "phoenix":
                base = PHOENIX_ENTITIES[name]
                ents.append(replace(base, num_hashes=num_hashes, num_buckets=num_buckets))
            else:
                ents.append(EntityHash(name, num_hashes, num_buckets, "default", seed=seed + i))
        return cls(entities=tuple(ents))

    def __contains__(self, name: object) -> bool:
        """Whether an entity block is named ``name`` (e.g. ``"feature" in config``)."""
        return any(e.name == name for e in self.entities)

    def __getitem__(self, name: str) -> EntityHash:
        for e in self.entities:
            if e.name == name:
                return e
        raise KeyError(f"no entity {name!r}; configured: {[e.name for e in self.entities]}")

    def offset(self, name: str) -> int:
        """First row of the entity's block (hash h lands on row offset + h)."""
        start = 1 + self.reserved_rows
        for e in self.entities:
            if e.name == name:
                return start
            start += e.block_rows
        raise KeyError(f"no entity {name!r}; configured: {[e.name for e in self.entities]}")

    @property
    def num_rows(self) -> int:
        return 1 + self.reserved_rows + sum(e.block_rows for e in self.entities)

    def row_range(self, name: str) -> tuple[int, int]:
        """Valid non-padding rows of the entity: [lo, hi] inclusive."""
        off = self.offset(name)
        return off + 1, off + self[name].block_rows - 1

    def rows(self, name: str, ids: np.ndarray | list) -> np.ndarray:
        """Raw IDs -> rows of the fused table, int64 ``ids.shape + (num_slots,)`` (0 stays 0)."""
        h = self[name].local(ids)
        return np.where(h == 0, 0, h + self.offset(name))

    def rows_torch(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """``rows`` for tensors; layouts other than multihash compute on the host."""
        if self[name].layout != "multihash":
            h = torch.from_numpy(self[name].local(ids.cpu().numpy())).to(ids.device)
        else:
            h = self[name].hash_torch(ids)
        return torch.where(h == 0, h, h + self.offset(name))

    @property
    def frequency_map_bytes(self) -> int:
        """Bytes of the hybrid layouts' head-ID maps (sorted int64 IDs)."""
        return sum(8 * len(e.head_ids) for e in self.entities)

    def to_dict(self) -> dict:
        return {
            "reserved_rows": self.reserved_rows,
            "entities": [
                {
                    **{f: getattr(e, f) for f in e.__dataclass_fields__},
                    "scales": list(e.scales),
                    "biases": list(e.biases),
                    "head_ids": list(e.head_ids),
                }
                for e in self.entities
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> HashConfig:
        ents = tuple(
            EntityHash(
                **{
                    **e,
                    "scales": tuple(e["scales"]),
                    "biases": tuple(e["biases"]),
                    "head_ids": tuple(e.get("head_ids", ())),
                }
            )
            for e in d["entities"]
        )
        return cls(entities=ents, reserved_rows=d["reserved_rows"])
