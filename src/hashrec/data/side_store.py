"""Side features by ID, for serving: what training joined onto each log row, looked up per request.

Training (``load_log``) joins every log row with its user's and its post's side features, takes
the post's age at the row's time and the row's continuous signals (play time / duration), and
standardises the numbers (``hashrec.data.features``; a model's by its training rows'
statistics, ``SideColumns.fit_stats``, which its checkpoint records). A served ranker needs the
same numbers for a request that is not in the log: ``SideStore`` keeps the side tables by user
and post ID (columns that training read from the log rows are kept by ID too, the latest row's
value) and training's standardisation; ``side_batch`` turns a request's rows into the
``SideBatch`` training would have built for them. ``load_log`` builds the store while it reads
the log and computes the training rows' own features through the same lookups, so the two
cannot drift apart.

What only the client knows comes with the request: each history event's signal columns that
training read from the log row (e.g. KuaiRand's ``play_time_ms``; a column that is also one of
the post's numeric features, such as ``duration_ms``, defaults to the post's value) and each
candidate's impression time (the post's age). An unknown user or post gets training's
missing-value treatment: categorical ID 0, numbers standardised to 0, bucket 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from hashrec.data.features import (
    SideColumns,
    checked_stats,
    history_signal,
    post_age_days,
    sorted_lookup,
)
from hashrec.hashing.config import HashConfig
from hashrec.nn.side import SideBatch, SideConfig

__all__ = ["Keyed", "RateTables", "SideStore", "left_padded_history", "side_batch"]


@dataclass(frozen=True)
class Keyed:
    """One side column by ID: sorted unique ``keys`` [n] int64 and their ``values`` [n, ...]
    (categorical value IDs, or raw numbers); an absent ID reads as missing (0 / NaN), or as
    ``lookup``'s ``default``.

    >>> col = Keyed(np.array([3, 8]), np.array([1.5, 2.5]))
    >>> col.lookup(np.array([8, 4])).tolist()
    [2.5, nan]
    """

    keys: np.ndarray
    values: np.ndarray

    @property
    def missing(self) -> float | int:
        return np.nan if self.values.dtype.kind == "f" else 0

    def lookup(self, ids: np.ndarray, default: Any = None) -> np.ndarray:
        """Values of ``ids`` [m] -> [m, ...]; an absent ID gets ``default`` (one value's shape;
        None: missing)."""
        fill = self.missing if default is None else default
        shape = (*np.shape(ids), *self.values.shape[1:])
        if not len(self.keys):  # a column without a single value
            return np.broadcast_to(np.asarray(fill, self.values.dtype), shape).copy()
        pos, found = sorted_lookup(self.keys, ids)
        found = found.reshape(found.shape + (1,) * (self.values.ndim - 1))
        return np.where(found, self.values[pos], fill)

    @classmethod
    def latest(cls, ids: np.ndarray, values: np.ndarray, time: np.ndarray) -> Keyed:
        """Each ID's value in its latest row with a value (by ``time``; ties: the later row):
        a row missing the value (NaN; 0 for categorical IDs) does not hide an earlier real one.

        >>> Keyed.latest(np.array([5, 5, 2]), np.array([1, 7, 4]), np.array([0, 9, 3])).values
        array([4, 7])
        >>> Keyed.latest(np.array([5, 5]), np.array([1.5, np.nan]), np.array([0, 9])).values
        array([1.5])
        """
        keep = ~np.isnan(values) if values.dtype.kind == "f" else values != 0
        ids, values, time = ids[keep], values[keep], time[keep]
        if not len(ids):  # nothing but missing values: every lookup is missing
            return cls(ids, values)
        order = np.lexsort((np.arange(len(ids)), time, ids))  # by ID, then time, then row
        last = np.r_[ids[order][1:] != ids[order][:-1], True]
        return cls(ids[order][last], values[order][last])


@dataclass(frozen=True)
class RateTables:
    """A ``--rate-features`` model's smoothed rates by ID, as served: ``tables["user"]``,
    ``["post"]``, ``["author"]`` hold each ID's standardised rate logits [n, A] (float32, over
    every training row), ``unseen[entity]`` [A] those of an ID no training row has (the prior).
    Built by ``hashrec.evaluation.experiment.rate_tables``; the numbers a training row after
    the last training day carries, bit for bit.

    >>> t = RateTables(("click",), {"user": Keyed(np.array([4]), np.array([[1.5]], np.float32))},
    ...                {"user": np.array([-0.5], np.float32)})
    >>> t.lookup("user", np.array([4, 9])).tolist()
    [[1.5], [-0.5]]
    """

    actions: tuple[str, ...]
    tables: dict[str, Keyed]
    unseen: dict[str, np.ndarray]

    def lookup(self, entity: str, ids: np.ndarray) -> np.ndarray:
        """[n, A] float32 of ``ids`` [n] (``entity``: user, post or author)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        return self.tables[entity].lookup(ids, default=self.unseen[entity])

    def names(self, entity: str) -> tuple[str, ...]:
        return tuple(f"{entity}_rate:{a}" for a in self.actions)


@dataclass
class SideStore:
    """The side features of users and posts by ID, and training's standardisation.

    Columns in training's order (``SideColumns.names`` of the log): ``user_categorical`` /
    ``post_categorical`` value IDs, ``user_numeric`` / ``post_numeric`` raw values (bucketised
    and standardised on the way out), ``post_created`` (epoch ms: the post's age at the
    impression is one more numeric post feature, ``post_age_days``), ``signals`` (name,
    numerator column, denominator column or "") of history events and ``signal_columns``: those
    columns by post ID where a post has one value (its table's, or one of its numeric
    features). ``request_columns``: the signal columns training read from each log row, which a
    request sends per history event.

    >>> store = SideStore(
    ...     user_categorical={"level": Keyed(np.array([1, 2]), np.array([11, 12]))},
    ...     post_numeric={"length": Keyed(np.array([10]), np.array([30.0]))},
    ...     stats={"post_num:length": (3.0, 0.5)})
    >>> cat, num = store.post_features(np.array([10, 99]), np.array([0, 0]))
    >>> cat.shape, [round(float(x), 3) for x in num[:, 0]]  # (log1p(30) - 3) / 0.5; unknown: 0
    ((2, 1), [0.868, 0.0])
    """

    user_categorical: dict[str, Keyed] = field(default_factory=dict)
    user_numeric: dict[str, Keyed] = field(default_factory=dict)
    post_categorical: dict[str, Keyed] = field(default_factory=dict)
    post_numeric: dict[str, Keyed] = field(default_factory=dict)
    post_created: Keyed | None = None
    signals: tuple[tuple[str, str, str], ...] = ()
    signal_columns: dict[str, Keyed] = field(default_factory=dict)
    request_columns: tuple[str, ...] = ()
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    rates: RateTables | None = None  # a --rate-features model's: after the other numbers

    # -- what the store gives ------------------------------------------------------------------
    def _post_num_names(self) -> tuple[str, ...]:
        return (*self.post_numeric, *(("post_age_days",) if self.post_created else ()))

    def _rate_names(self, *entities: str) -> tuple[str, ...]:
        r = self.rates
        return () if r is None else tuple(n for e in entities for n in r.names(e))

    @property
    def names(self) -> dict[str, tuple[str, ...]]:
        """The field names in training's order (as ``SideColumns.names``)."""
        post_num = self._post_num_names()
        return {
            "user_cat": (*self.user_categorical, *(f"{k}#bucket" for k in self.user_numeric)),
            "post_cat": (*self.post_categorical, *(f"{k}#bucket" for k in post_num)),
            "user_num": (*self.user_numeric, *self._rate_names("user")),
            "post_num": (*post_num, *self._rate_names("post", "author")),
            "signals": tuple(name for name, _, _ in self.signals),
        }

    def side_config(self, hash_config: HashConfig) -> SideConfig:
        """The ``SideConfig`` a ranker trained on these features has (categorical fields only
        with a ``feature`` block, as ``hashrec.evaluation.experiment.side_config``)."""
        n = self.names
        block = "feature" in hash_config
        return SideConfig(len(n["user_cat"]) if block else 0, len(n["post_cat"]) if block else 0,
                          len(n["user_num"]), len(n["post_num"]), len(n["signals"]))  # fmt: skip

    def with_stats(self, stats: dict[str, Any]) -> SideStore:
        """This store standardising with ``stats`` (a checkpoint's ``extra["side_stats"]``:
        its training rows' statistics), what serving a model needs. ValueError naming the
        numbers ``stats`` lacks (a model trained without them).

        >>> store = SideStore(stats={"post_num:length": (3.0, 0.5)})
        >>> store.with_stats({"post_num:length": [2.0, 1.0]}).stats
        {'post_num:length': (2.0, 1.0)}
        """
        return replace(self, stats=checked_stats(stats, self.stats))

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Signal columns a request must send per history event (no per-post default)."""
        return tuple(c for c in self.request_columns if c not in self.signal_columns)

    # -- lookups -------------------------------------------------------------------------------
    def user_features(self, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Categorical value IDs [n, Fu] int64 and standardised numbers [n, Nu] float32."""
        ids = np.asarray(user_ids, np.int64).reshape(-1)
        side = SideColumns.build(
            {k: c.lookup(ids) for k, c in self.user_categorical.items()}, {},
            {k: c.lookup(ids) for k, c in self.user_numeric.items()}, {}, {}, len(ids),
            stats=self.stats,
        )  # fmt: skip
        if self.rates is None:
            return side.user_cat, side.user_num
        return side.user_cat, np.concatenate([side.user_num, self.rates.lookup("user", ids)], 1)

    def post_features(
        self, post_ids: np.ndarray, time_ms: np.ndarray, author_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Categorical value IDs [n, Fp] int64 and standardised numbers [n, Np] float32 of posts
        shown at ``time_ms`` [n] (epoch ms: the post's age) by ``author_ids`` [n] (needed only
        with ``rates``: the author's rates follow the post's)."""
        ids = np.asarray(post_ids, np.int64).reshape(-1)
        nums = {k: c.lookup(ids) for k, c in self.post_numeric.items()}
        if self.post_created is not None:
            time = np.asarray(time_ms, np.int64).reshape(-1)
            nums["post_age_days"] = post_age_days(time, self.post_created.lookup(ids))
        side = SideColumns.build({}, {k: c.lookup(ids) for k, c in self.post_categorical.items()},
                                 {}, nums, {}, len(ids), stats=self.stats)  # fmt: skip
        if self.rates is None:
            return side.post_cat, side.post_num
        got = None if author_ids is None else list(np.shape(author_ids))
        if got != [len(ids)]:
            raise ValueError(f"post_features: this store serves rate features, which need "
                             f"author_ids of shape [{len(ids)}], got {got}")  # fmt: skip
        rates = [self.rates.lookup("post", ids), self.rates.lookup("author", author_ids)]
        return side.post_cat, np.concatenate([side.post_num, *rates], 1)

    def history_signals(
        self, post_ids: np.ndarray, values: Mapping[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """Standardised signals [n, Ah] float32 of history events on ``post_ids`` [n], from
        ``values`` (column -> [n] raw numbers, NaN = not sent); a column not sent takes the
        post's own value where it has one (``signal_columns``), else a ValueError names it."""
        ids = np.asarray(post_ids, np.int64).reshape(-1)
        values = values or {}
        cols: dict[str, np.ndarray] = {}
        if len(ids) == 0:
            return np.zeros((0, len(self.signals)), np.float32)
        for name, num, den in self.signals:
            for c in (num, den):
                if not c or c in cols:
                    continue
                given = values.get(c)
                fallback = self.signal_columns.get(c)
                if given is None and fallback is None:
                    raise ValueError(f"history events need {c!r} (a history signal of this "
                                     f"ranker, {name!r}); it was not given")  # fmt: skip
                x = np.full(len(ids), np.nan) if given is None else np.asarray(given, np.float64)
                x = x.reshape(-1)
                if len(x) != len(ids):
                    raise ValueError(f"history {c!r} has {len(x)} values, expected {len(ids)}")
                if fallback is not None:
                    x = np.where(np.isnan(x), fallback.lookup(ids), x)
                cols[c] = x
        raw = {name: history_signal(cols[num], cols[den] if den else None)
               for name, num, den in self.signals}  # fmt: skip
        return SideColumns.build({}, {}, {}, {}, raw, len(ids), stats=self.stats).signals


def _rows(hash_config: HashConfig, ids: np.ndarray) -> np.ndarray:
    """Fused-table rows [..., F, K] of categorical value IDs [..., F] (as ``RowHashes``; no
    ``feature`` block: no categorical fields, as ``side_config`` counts them)."""
    if "feature" not in hash_config:
        return np.zeros((*ids.shape[:-1], 0, 1), np.int64)
    return hash_config.rows("feature", ids)


def left_padded_history(
    store: SideStore,
    histories: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]],
    S: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each request's (post IDs [n], signal column -> [n] raw values) history -> post IDs
    [B, S] and values {column: [B, S]} (NaN: not sent) of its latest ``S`` events, right-aligned
    as training collates them (0 = padding). A request with events but without a signal column
    it must send (``SideStore.required_columns``) raises ValueError naming it.

    >>> store = SideStore(request_columns=("watch_ms",))
    >>> hp, values = left_padded_history(store, [(np.array([4, 5, 6]),
    ...                                            {"watch_ms": np.array([1., 2., 3.])})], 2)
    >>> hp.tolist(), values["watch_ms"].tolist()
    ([[5, 6]], [[2.0, 3.0]])
    """
    hp = np.zeros((len(histories), S), np.int64)
    values = {c: np.full((len(histories), S), np.nan) for c in store.request_columns}
    for i, (posts, signals) in enumerate(histories):
        n = min(len(posts), S)
        if not n:
            continue
        missing = [c for c in store.required_columns if c not in signals]
        if missing:
            raise ValueError(f"history events need {missing[0]!r}: a history signal of this "
                             "ranker")  # fmt: skip
        hp[i, S - n :] = posts[len(posts) - n :]
        for c, v in signals.items():
            if c in values:
                values[c][i, S - n :] = v[len(v) - n :]
    return hp, values


def side_batch(
    store: SideStore,
    hash_config: HashConfig,
    user_ids: np.ndarray,
    history_post_ids: np.ndarray,
    history_values: Mapping[str, np.ndarray],
    candidate_post_ids: np.ndarray,
    candidate_time_ms: np.ndarray,
    candidate_author_ids: np.ndarray | None = None,
) -> SideBatch:
    """The ``SideBatch`` training builds for these request rows (``hashrec.data.collate``).

    user_ids [B] (0: no user, features missing; a store's rates read the prior's, as for any
    user without training rows); history_post_ids [B, S] (0 = padding: signals
    0); history_values: signal column -> [B, S] raw numbers (NaN = not sent, see
    ``SideStore.history_signals``); candidate_post_ids [B, C] (0 = padding: features 0),
    candidate_time_ms [B, C] (epoch ms of the impression) and candidate_author_ids [B, C]
    (needed only when the store serves rates). Hashes with ``hash_config``'s ``feature``
    block, as training does.

    >>> store = SideStore(post_categorical={"genre": Keyed(np.array([10]), np.array([77]))})
    >>> from hashrec.hashing.config import EntityHash
    >>> cfg = HashConfig(entities=(*HashConfig.uniform(101).entities,
    ...                            EntityHash("feature", 2, 53)))
    >>> b = side_batch(store, cfg, np.array([1]), np.zeros((1, 3), np.int64), {},
    ...                np.array([[10, 0]]), np.zeros((1, 2), np.int64))
    >>> b.candidate_feature_rows.shape, bool((b.candidate_feature_rows[0, 1] == 0).all())
    (torch.Size([1, 2, 1, 2]), True)
    """
    cfg = store.side_config(hash_config)
    users = np.asarray(user_ids, np.int64)
    hp = np.asarray(history_post_ids, np.int64)
    cp = np.asarray(candidate_post_ids, np.int64)
    B, S = hp.shape
    C = cp.shape[1]
    if users.shape != (B,) or cp.shape[0] != B or np.shape(candidate_time_ms) != cp.shape:
        raise ValueError(f"side_batch: user_ids {list(users.shape)}, history_post_ids "
                         f"{[B, S]}, candidate_post_ids {list(cp.shape)} and candidate_time_ms "
                         f"{list(np.shape(candidate_time_ms))} disagree")  # fmt: skip
    for c, v in history_values.items():
        if np.shape(v) != (B, S):
            raise ValueError(f"side_batch: history {c!r} has shape {list(np.shape(v))}, "
                             f"expected {[B, S]}")  # fmt: skip
    ucat, unum = store.user_features(users)
    # padding slots stay zero, as training's ``_gather`` leaves them
    valid = cp.reshape(-1) != 0
    pcat = np.zeros((B * C, len(store.names["post_cat"])), np.int64)
    pnum = np.zeros((B * C, cfg.post_numeric), np.float32)
    times = np.asarray(candidate_time_ms, np.int64).reshape(-1)
    authors = None
    if candidate_author_ids is not None:
        if np.shape(candidate_author_ids) != cp.shape:
            raise ValueError(f"side_batch: candidate_author_ids "
                             f"{list(np.shape(candidate_author_ids))} and candidate_post_ids "
                             f"{list(cp.shape)} disagree")  # fmt: skip
        authors = np.asarray(candidate_author_ids, np.int64).reshape(-1)[valid]
    pcat[valid], pnum[valid] = store.post_features(cp.reshape(-1)[valid], times[valid], authors)
    events = hp.reshape(-1) != 0
    sig = np.zeros((B * S, cfg.history_signals), np.float32)
    sig[events] = store.history_signals(
        hp.reshape(-1)[events],
        {c: np.asarray(v, np.float64).reshape(-1)[events] for c, v in history_values.items()},
    )
    t = torch.from_numpy
    return SideBatch(
        user_feature_rows=t(_rows(hash_config, ucat)),
        user_numeric=t(unum),
        history_signals=t(np.ascontiguousarray(sig.reshape(B, S, -1))),
        candidate_feature_rows=t(_rows(hash_config, pcat.reshape(B, C, -1))),
        candidate_numeric=t(np.ascontiguousarray(pnum.reshape(B, C, -1))),
    ).validate(cfg, B, S, C)
