"""Table layouts at a byte budget, and the hybrid's frequency map, from a log's training days.

Every scheme gets the same bytes per entity: ``fraction`` x the full table's rows (one row per
distinct ID), counted as table rows plus their row-wise Adagrad state plus, for the hybrid, its
frequency map (8 bytes per head ID). IDs are counted on the training rows only, so nothing about
the evaluation days leaks into the layout; IDs first seen later fall to the hashed tail.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from hashrec.data.schema import InteractionLog
from hashrec.hashing.config import EntityHash, HashConfig
from hashrec.hashing.layouts import LAYOUTS

__all__ = [
    "ENTITY_WEIGHTS",
    "TABLE_SCHEMES",
    "entity_budgets",
    "frequency_map",
    "row_bytes",
    "table_config",
]

ENTITIES = ("user", "post", "author")
TABLE_SCHEMES: tuple[str, ...] = LAYOUTS
# default row sharing between entities (--entity-weights): rows per distinct ID, relative
ENTITY_WEIGHTS: dict[str, float] = {"user": 1.0, "post": 4.0, "author": 2.0, "feature": 2.0}
# hybrid: share of an entity's budget spent on private rows (``head_share``); chosen on the
# validation day by benchmarks/study_ranker.py (never on evaluation days)
HEAD_SHARE = 0.5
WEIGHT_SHARE = 0.25  # weighted: share of the budget spent on importance-weight rows


def row_bytes(dim: int, dtype_bytes: int = 4) -> int:
    """Bytes one table row costs: D values plus its fp32 row-wise Adagrad accumulator."""
    return dim * dtype_bytes + 4


def frequency_map(ids: np.ndarray, top: int) -> np.ndarray:
    """The ``top`` most frequent non-zero IDs of ``ids`` (ties: smaller ID first), sorted.

    >>> frequency_map(np.array([7, 7, 3, 9, 9, 9, 0, 0, 0, 0]), top=2).tolist()
    [7, 9]
    """
    u, c = np.unique(ids[ids != 0], return_counts=True)
    order = np.lexsort((u, -c))  # by count descending, then ID
    return np.sort(u[order[:top]])


def _entity(
    name: str, scheme: str, budget: int, k: int, hash_scheme: str, seed: int,
    train_ids: np.ndarray, rb: int, head_share: float = HEAD_SHARE,
) -> EntityHash:  # fmt: skip
    # the same hash functions as HashConfig.sized (entity i seeded seed + i)
    base = HashConfig.sized(dict.fromkeys(ENTITIES, 2), k if scheme != "qr" else 2,
                            hash_scheme, seed)[name]  # fmt: skip
    if scheme == "multihash":
        return _with(base, num_buckets=max(2, budget))
    if scheme == "hybrid":
        per_head = 1 + 8 / rb  # a private row plus its 8-byte entry in the frequency map
        top = min(int(head_share * budget / per_head), len(np.unique(train_ids[train_ids != 0])))
        head = frequency_map(train_ids, top)
        n = max(2, budget - len(head) - math.ceil(8 * len(head) / rb))
        return _with(base, num_buckets=n, layout="hybrid", head_ids=tuple(head.tolist()))
    if scheme == "qr":
        n = max(2, math.ceil(budget / 2))
        return _with(base, num_hashes=2, num_buckets=n, layout="qr",
                     extra_rows=max(1, budget - n))  # fmt: skip
    if scheme == "weighted":
        w = max(1, math.ceil(WEIGHT_SHARE * budget))
        return _with(base, num_buckets=max(2, budget - w), layout="weighted", extra_rows=w)
    raise ValueError(f"table scheme must be one of {TABLE_SCHEMES}, got {scheme!r}")


def _with(base: EntityHash, **changes) -> EntityHash:
    return replace(base, **changes)


def entity_budgets(
    log: InteractionLog,
    fraction: float,
    weights: dict[str, float] | None = None,
    side_features: bool = True,
) -> dict[str, int]:
    """Rows per entity block (user, post, author, and ``feature`` when the log has categorical
    side values and ``side_features`` is on).

    Without ``weights``: ``fraction`` x the entity's distinct IDs. With ``weights`` (entity ->
    weight; missing ones 1): the whole table, reserved rows included, holds at most ``fraction``
    of the collision-free table's rows (on a tiny log where the reserved rows alone would fill
    that, half of ``fraction`` x the IDs), shared out so that a block is proportional to
    weight x its distinct IDs (posts decide within-user ranking, so they get more rows per ID
    than users, whose history speaks for them). The collision-free table is the log's, side
    values included, so turning side features off keeps the table's bytes and gives the feature
    block's share to user, post and author.
    """
    ids = {name: len(np.unique(getattr(log, name))) for name in ENTITIES}
    values = np.unique(np.concatenate([log.side.user_cat.ravel(), log.side.post_cat.ravel()]))
    n_values = int((values != 0).sum())
    if side_features and n_values:
        ids["feature"] = n_values
    if weights is None:
        return {e: max(2, math.ceil(fraction * n)) for e, n in ids.items()}
    unknown = set(weights) - set(ENTITY_WEIGHTS)
    if unknown:
        raise ValueError(f"weights names {sorted(unknown)}; entities: {list(ENTITY_WEIGHTS)}")
    reserved = HashConfig().reserved_rows + 1
    n_ids = sum(ids[e] for e in ENTITIES) + n_values
    budget = fraction * (n_ids + reserved) - reserved - len(ids)
    # a tiny log, where the reserved rows alone fill the share: keep half the per-ID share
    # rather than blocks of 2 rows in which every ID collides
    budget = max(budget, 0.5 * fraction * n_ids)
    scale = budget / sum(weights.get(e, 1.0) * n for e, n in ids.items())
    return {e: max(2, int(max(0.0, scale * weights.get(e, 1.0)) * n) + 1) for e, n in ids.items()}


def table_config(
    log: InteractionLog,
    train_mask: np.ndarray,
    scheme: str = "multihash",
    fraction: float = 0.25,
    num_hashes: int = 2,
    dim: int = 32,
    hash_scheme: str = "default",
    seed: int = 1,
    weights: dict[str, float] | None = None,
    head_share: float = HEAD_SHARE,
    side_features: bool = True,
) -> HashConfig:
    """A ``HashConfig`` of ``scheme`` whose entity blocks cost ``entity_budgets`` rows' worth of
    bytes (without ``weights``: ``fraction`` x the bytes of a one-row-per-ID table each).

    ``multihash``: k hashes into the budget's rows (Phoenix). ``hybrid``: ``head_share`` of the
    bytes buy private rows for the most frequent training IDs (never more than there are
    distinct training IDs), the rest a k-hashed tail for rarer and later IDs. ``qr``: half
    remainder rows, half quotient rows. ``weighted``: a quarter importance-weight rows. The
    log's categorical side values get a ``feature`` block (plain multi-hash, the default hash:
    X publishes no constants for it), unless ``side_features`` is off (the model reads none).
    """
    if scheme not in TABLE_SCHEMES:
        raise ValueError(f"table scheme must be one of {TABLE_SCHEMES}, got {scheme!r}")
    if not fraction > 0:
        raise ValueError(f"fraction must be > 0, got {fraction}")
    if not 0.0 <= head_share < 1.0:
        raise ValueError(f"head_share must be in [0, 1) (the tail needs rows), got {head_share}")
    if len(train_mask) != len(log.user):
        raise ValueError(f"train_mask has {len(train_mask)} rows, the log {len(log.user)}")
    rb = row_bytes(dim)
    budgets = entity_budgets(log, fraction, weights, side_features)
    ents = [
        _entity(name, scheme, budgets[name], num_hashes, hash_scheme, seed,
                getattr(log, name)[train_mask], rb, head_share)
        for name in ENTITIES
    ]  # fmt: skip
    if "feature" in budgets:
        ents.append(EntityHash("feature", num_hashes, budgets["feature"], "default", seed=4))
    return HashConfig(entities=tuple(ents))
