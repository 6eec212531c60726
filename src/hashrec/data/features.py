"""Side features of users and posts, declared in the ``LogSchema``, none required.

Categorical columns (a video's type or tag, a user's activity level) become value IDs: the
xxh64 hash of ``"column=value"`` (0 = missing), later hashed into the fused table's ``feature``
block like any other ID. Numeric columns (duration, follower counts, the post's age at the
impression) are log-scaled, ``sign(x) * log1p(|x|)``, standardised (feature values only, never
labels; a model by its training rows' statistics, ``SideColumns.fit_stats``, which its
checkpoint keeps), and also bucketised: the rounded log value is one more categorical value, so
the model sees both a smooth and a per-range signal. History events carry continuous signals
(``history_signals``, e.g. play time / duration), as Phoenix's newer model carries continuous
and post-age embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from hashrec.hashing.functions import ids_to_int64

if TYPE_CHECKING:
    from hashrec.data.side_store import SideStore

__all__ = [
    "SideColumns",
    "bucket_ids",
    "categorical_ids",
    "checked_stats",
    "history_signal",
    "log_scale",
    "post_age_days",
    "read_side_table",
    "sorted_lookup",
    "standard_stats",
    "standardise",
]

_SEED = 11  # xxh64 seed of categorical values (any fixed value; part of the format)


def sorted_lookup(keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``query`` in the sorted array ``keys`` and whether each was found.

    >>> pos, found = sorted_lookup(np.array([2, 5, 9]), np.array([5, 7]))
    >>> pos.tolist(), found.tolist()
    ([1, 2], [True, False])
    """
    if len(keys) == 0:
        return np.zeros(len(query), dtype=np.int64), np.zeros(len(query), dtype=bool)
    pos = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
    return pos, keys[pos] == query


def categorical_ids(column: str, values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Value IDs [n] int64: xxh64("column=value"), 0 where ``valid`` is False.

    >>> a = categorical_ids("tag", np.array(["3", "3", "7"]))
    >>> bool(a[0] == a[1] != a[2]), bool(categorical_ids("music", np.array(["3"]))[0] != a[0])
    (True, True)
    """
    uniq, inv = np.unique(np.asarray(values).astype(str), return_inverse=True)
    ids = ids_to_int64(np.array([f"{column}={u}" for u in uniq], dtype=object), seed=_SEED)
    out = ids[inv.reshape(-1)]
    if valid is not None:
        out = np.where(valid, out, 0)
    return out


def log_scale(x: np.ndarray) -> np.ndarray:
    """sign(x) * log1p(|x|), NaN kept (missing)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.log1p(np.abs(x))


def standard_stats(x: np.ndarray) -> tuple[float, float]:
    """(mean, scale) that ``standardise`` divides by: over the non-missing values of ``x``;
    scale 1 for a constant column; (nan, nan) when every value is missing.

    >>> standard_stats(np.array([1.0, 3.0, np.nan]))
    (2.0, 1.0)
    """
    ok = ~np.isnan(x)
    if not ok.any():
        return float("nan"), float("nan")
    mu, sd = float(x[ok].mean()), float(x[ok].std())
    return mu, (sd if sd > 0 else 1.0)


def checked_stats(stats: Mapping[str, Any], keys: Iterable[str]) -> dict[str, tuple[float, float]]:
    """``stats`` (a checkpoint's ``side_stats``) for ``keys``, as (mean, scale) floats; a
    ValueError naming the numbers it lacks or an entry that is not a finite mean and a scale
    > 0 (or NaN, NaN: a column without a value).

    >>> checked_stats({"post_num:n": [1, 2.0]}, ["post_num:n"])
    {'post_num:n': (1.0, 2.0)}
    """
    keys = list(keys)
    if not isinstance(stats, Mapping):
        raise ValueError("side feature statistics: expected a mapping of name -> [mean, scale], "
                         f"got {type(stats).__name__}")  # fmt: skip
    missing = sorted(set(keys) - set(stats))
    if missing:
        raise ValueError(f"side feature statistics: none for {missing} (they cover "
                         f"{sorted(stats)})")  # fmt: skip
    out = {}
    for k in keys:
        v = stats[k]
        try:
            if isinstance(v, str | bytes) or any(isinstance(x, str | bytes) for x in v):
                raise TypeError  # "12" would unpack as 1.0, 2.0
            mu, sd = (float(x) for x in v)
        except (TypeError, ValueError):
            raise ValueError(f"side feature statistics {k!r}: expected [mean, scale], got "
                             f"{v!r}") from None  # fmt: skip
        if not ((np.isfinite(mu) and np.isfinite(sd) and sd > 0) or (mu != mu and sd != sd)):
            raise ValueError(f"side feature statistics {k!r}: expected a finite mean and a "
                             f"scale > 0 (or NaN, NaN), got {[mu, sd]}")  # fmt: skip
        out[k] = (mu, sd)
    return out


def standardise(x: np.ndarray, stats: tuple[float, float]) -> np.ndarray:
    """(x - mean) / scale as float32, 0 where x is missing (or the column never had a value).

    Training takes ``stats`` from its own rows (``standard_stats``, ``SideColumns.fit_stats``);
    serving reuses them from the checkpoint, so a value gets the same number in both.

    >>> standardise(np.array([1.0, np.nan, 5.0]), (3.0, 2.0)).tolist()
    [-1.0, 0.0, 1.0]
    """
    x = np.asarray(x, dtype=np.float64)
    mu, sd = stats
    if np.isnan(mu):
        return np.zeros(len(x), np.float32)
    return np.where(~np.isnan(x), (x - mu) / sd, 0.0).astype(np.float32)


def bucket_ids(name: str, x: np.ndarray) -> np.ndarray:
    """The bucket of a numeric value as one more categorical field ``name#bucket``: the value
    ID of round(2 * log_scale(x)); 0 where x is missing.

    >>> b = bucket_ids("fans", np.array([10.0, 11.0, np.nan, 1e6]))
    >>> bool(b[0] == b[1] != b[3]), int(b[2])
    (True, 0)
    """
    lx = log_scale(x)
    ok = ~np.isnan(lx)
    return categorical_ids(f"{name}#bucket", np.round(2 * np.where(ok, lx, 0)).astype(np.int64), ok)


def post_age_days(time_ms: np.ndarray, created_ms: np.ndarray) -> np.ndarray:
    """A post's age at an impression, in days (>= 0; NaN where the creation time is missing).

    >>> post_age_days(np.array([2 * 86_400_000, 0]), np.array([0.0, np.nan])).tolist()
    [2.0, nan]
    """
    return np.maximum(time_ms - created_ms, 0) / 86_400_000


def history_signal(numerator: np.ndarray, denominator: np.ndarray | None) -> np.ndarray:
    """A history event's continuous signal before standardisation: log1p(num / max(den, 1))
    (log1p(num) without a denominator); a missing value counts as 0, a negative one too.

    >>> history_signal(np.array([5000.0, np.nan]), np.array([10000.0, 3.0])).round(4).tolist()
    [0.4055, 0.0]
    """
    x = np.maximum(np.nan_to_num(numerator), 0)
    if denominator is not None:
        x = x / np.maximum(np.nan_to_num(denominator), 1)
    return np.log1p(x)


@dataclass
class SideColumns:
    """Side features of every log row (each row carries its user's and its post's features).

    user_cat [n, Fu] / post_cat [n, Fp] int64 value IDs (0 = missing; numeric columns add one
    bucket field each); user_num [n, Nu] / post_num [n, Np] float32 standardised log values
    (0 = missing); signals [n, Ah] float32 standardised history signals. ``names``: the
    column names of each; ``stats``: the standardisation of each number (``build``,
    ``fit_stats``); ``raw``: each number before standardisation, keyed as ``stats``;
    ``raw_signals``: the history-signal columns read from the log rows, raw (what a served
    request carries); ``store``: the side tables by ID (``hashrec.data.side_store``), set by
    ``load_log``.

    >>> side = SideColumns.empty(3)
    >>> side.user_cat.shape, side.num_fields
    ((3, 0), 0)
    """

    user_cat: np.ndarray
    post_cat: np.ndarray
    user_num: np.ndarray
    post_num: np.ndarray
    signals: np.ndarray
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    raw_signals: dict[str, np.ndarray] = field(default_factory=dict)
    store: SideStore | None = None
    raw: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, n: int) -> SideColumns:
        z = np.zeros((n, 0), np.int64)
        f = np.zeros((n, 0), np.float32)
        return cls(z, z.copy(), f, f.copy(), f.copy())

    @classmethod
    def build(
        cls,
        user_cat: dict[str, np.ndarray],
        post_cat: dict[str, np.ndarray],
        user_num: dict[str, np.ndarray],
        post_num: dict[str, np.ndarray],
        signals: dict[str, np.ndarray],
        n: int,
        stats: dict[str, tuple[float, float]] | None = None,
    ) -> SideColumns:
        """From per-column arrays: categorical IDs, raw numeric values (NaN = missing; log-scaled,
        bucketised and standardised here) and signals (``history_signal`` values).

        ``stats``: the standardisation of each numeric column and signal, keyed
        ``user_num:name`` / ``post_num:name`` / ``signals:name``; None computes them over these
        rows (the whole log as read; training refits them on its rows, ``fit_stats``) and
        records them in ``self.stats`` (serving passes training's back in)."""
        computed: dict[str, tuple[float, float]] = {}
        raw: dict[str, np.ndarray] = {}

        def std(kind: str, name: str, x: np.ndarray) -> np.ndarray:
            key = f"{kind}:{name}"
            raw[key] = x
            computed[key] = standard_stats(x) if stats is None else stats[key]
            return standardise(x, computed[key])

        def cats(d: dict, nums: dict) -> tuple[np.ndarray, tuple[str, ...]]:
            cols = dict(d)
            for name, x in nums.items():  # bucket of the log value: one more categorical field
                cols[f"{name}#bucket"] = bucket_ids(name, x)
            if not cols:
                return np.zeros((n, 0), np.int64), ()
            return np.stack(list(cols.values()), axis=1).astype(np.int64), tuple(cols)

        def nums(kind: str, d: dict, scale=log_scale) -> np.ndarray:
            if not d:
                return np.zeros((n, 0), np.float32)
            return np.stack([std(kind, k, scale(x)) for k, x in d.items()], axis=1)

        uc, ucn = cats(user_cat, user_num)
        pc, pcn = cats(post_cat, post_num)
        sig = nums("signals", signals, scale=lambda x: x)
        names = {"user_cat": ucn, "post_cat": pcn, "user_num": tuple(user_num),
                 "post_num": tuple(post_num), "signals": tuple(signals)}  # fmt: skip
        return cls(uc, pc, nums("user_num", user_num), nums("post_num", post_num), sig, names,
                   computed, raw=raw)  # fmt: skip

    def fit_stats(self, rows: np.ndarray) -> SideColumns:
        """These features with every number standardised by statistics of ``rows`` only (a
        mask or indices: training's rows, so no evaluation day shapes a feature); the store, if
        any, carries the same statistics (what serving looks up with).

        >>> side = SideColumns.build({}, {}, {}, {"n": np.array([0.0, 2.0, 6.0])}, {}, 3)
        >>> fit = side.fit_stats(np.array([True, True, False]))
        >>> [round(float(v), 3) for v in fit.post_num[:, 0]]  # log1p: 0, 1.099, 1.946
        [-1.0, 1.0, 2.542]
        """
        return self.with_stats(self.stats_of(rows))

    def stats_of(self, rows: np.ndarray) -> dict[str, tuple[float, float]]:
        """The standardisation statistics of every number over ``rows`` (``fit_stats``'s)."""
        return {k: standard_stats(x[rows]) for k, x in self.raw.items()}

    def with_stats(self, stats: dict[str, tuple[float, float]]) -> SideColumns:
        """These features standardised with ``stats`` (keyed as ``self.stats``; a checkpoint's
        ``side_stats``). ValueError naming the numbers ``stats`` lacks."""
        if not self.raw:
            return self
        stats = checked_stats(stats, self.raw)

        def nums(kind: str, old: np.ndarray) -> np.ndarray:
            # a column without a raw value (a rate feature, standardised when added) stays
            cols = [standardise(self.raw[k], stats[k]) if (k := f"{kind}:{n}") in self.raw
                    else old[:, j] for j, n in enumerate(self.names.get(kind, ()))]  # fmt: skip
            return np.stack(cols, axis=1) if cols else old

        store = None if self.store is None else replace(self.store, stats=stats)
        return SideColumns(self.user_cat, self.post_cat, nums("user_num", self.user_num),
                           nums("post_num", self.post_num), nums("signals", self.signals),
                           self.names, stats, self.raw_signals, store, self.raw)  # fmt: skip

    @property
    def num_fields(self) -> int:
        return self.user_cat.shape[1] + self.post_cat.shape[1]

    @property
    def any(self) -> bool:
        return any(a.shape[1] for a in self._arrays())

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return self.user_cat, self.post_cat, self.user_num, self.post_num, self.signals

    def take(self, idx: np.ndarray) -> SideColumns:
        rows = lambda d: {k: v[idx] for k, v in d.items()}  # noqa: E731
        return SideColumns(*(a[idx] for a in self._arrays()), names=self.names,
                           stats=self.stats, raw_signals=rows(self.raw_signals),
                           store=self.store, raw=rows(self.raw))  # fmt: skip


def read_side_table(
    path: str, key: str | None, categorical: tuple[str, ...], numeric: tuple[str, ...],
    table=None,
) -> tuple[np.ndarray | None, dict[str, np.ndarray], dict[str, np.ndarray]]:  # fmt: skip
    """A side table (CSV/Parquet): sorted keys, categorical IDs and numeric values per key.

    Columns the table lacks are skipped (side features are optional); missing values become
    ID 0 / NaN; date strings in a numeric column become epoch ms. Duplicate keys keep the first
    row. ``key=None``: no join, one value per row of the file (the log itself); ``table``: the
    file already read as a pyarrow table.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if table is None:
        table = pq.read_table(path) if path.endswith(".parquet") else pacsv.read_csv(path)
    keys, first = None, slice(None)
    if key is not None:
        if key not in table.column_names:
            raise ValueError(f"{path}: missing key column {key}; it has {table.column_names}")
        keys = table.column(key).to_numpy(zero_copy_only=False)
        keys, first = np.unique(keys, return_index=True)
    cats, nums = {}, {}
    for c in categorical:
        if c in table.column_names:
            col = pc.cast(table.column(c), pa.string())
            valid = col.is_valid().to_numpy(zero_copy_only=False)
            vals = col.fill_null("").to_numpy(zero_copy_only=False)
            cats[c] = categorical_ids(c, vals, valid & (vals != ""))[first]
    for c in numeric:
        if c in table.column_names:
            col = table.column(c)
            if pa.types.is_string(col.type) or pa.types.is_date(col.type):
                nums[c] = _times_ms(col)[first]
            else:
                nums[c] = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)[first]
    return keys, cats, nums


def _times_ms(col) -> np.ndarray:
    """A date/datetime column (strings like 2022-04-10, or dates) -> epoch ms, NaN if missing."""
    import pyarrow as pa

    vals = col.cast(pa.string()).to_numpy(zero_copy_only=False)
    out = np.full(len(vals), np.nan)
    ok = np.array([isinstance(v, str) and len(v) > 0 for v in vals])
    if ok.any():
        out[ok] = np.array(vals[ok], dtype="datetime64[ms]").astype(np.int64)
    return out
