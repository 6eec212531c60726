"""Side features of users and posts, declared in the ``LogSchema``, none required.

Categorical columns (a video's type or tag, a user's activity level) become value IDs: the
xxh64 hash of ``"column=value"`` (0 = missing), later hashed into the fused table's ``feature``
block like any other ID. Numeric columns (duration, follower counts, the post's age at the
impression) are log-scaled, ``sign(x) * log1p(|x|)``, standardised over the log (feature values
only, never labels), and also bucketised: the rounded log value is one more categorical value,
so the model sees both a smooth and a per-range signal. History events carry continuous signals
(``history_signals``, e.g. play time / duration), as Phoenix's newer model carries continuous
and post-age embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hashrec.hashing.functions import ids_to_int64

__all__ = ["SideColumns", "categorical_ids", "log_scale", "read_side_table"]

_SEED = 11  # xxh64 seed of categorical values (any fixed value; part of the format)


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


def _standardise(x: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(x)
    if not ok.any():
        return np.zeros(len(x), np.float32)
    mu, sd = x[ok].mean(), x[ok].std()
    return np.where(ok, (x - mu) / (sd if sd > 0 else 1.0), 0.0).astype(np.float32)


@dataclass
class SideColumns:
    """Side features of every log row (each row carries its user's and its post's features).

    user_cat [n, Fu] / post_cat [n, Fp] int64 value IDs (0 = missing; numeric columns add one
    bucket field each); user_num [n, Nu] / post_num [n, Np] float32 standardised log values
    (0 = missing); signals [n, Ah] float32 standardised history signals. ``names``: the
    column names of each.

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
    ) -> SideColumns:
        """From per-column arrays: categorical IDs, raw numeric values (NaN = missing; log-scaled,
        bucketised and standardised here) and signals (already transformed)."""

        def cats(d: dict, nums: dict) -> tuple[np.ndarray, tuple[str, ...]]:
            cols = dict(d)
            for name, x in nums.items():  # bucket of the log value: one more categorical field
                lx = log_scale(x)
                ok = ~np.isnan(lx)
                cols[f"{name}#bucket"] = categorical_ids(
                    f"{name}#bucket", np.round(2 * np.where(ok, lx, 0)).astype(np.int64), ok
                )
            if not cols:
                return np.zeros((n, 0), np.int64), ()
            return np.stack(list(cols.values()), axis=1).astype(np.int64), tuple(cols)

        def nums(d: dict) -> np.ndarray:
            if not d:
                return np.zeros((n, 0), np.float32)
            return np.stack([_standardise(log_scale(x)) for x in d.values()], axis=1)

        uc, ucn = cats(user_cat, user_num)
        pc, pcn = cats(post_cat, post_num)
        sig = (
            np.stack([_standardise(x) for x in signals.values()], axis=1)
            if signals
            else np.zeros((n, 0), np.float32)
        )
        names = {"user_cat": ucn, "post_cat": pcn, "user_num": tuple(user_num),
                 "post_num": tuple(post_num), "signals": tuple(signals)}  # fmt: skip
        return cls(uc, pc, nums(user_num), nums(post_num), sig, names)

    @property
    def num_fields(self) -> int:
        return self.user_cat.shape[1] + self.post_cat.shape[1]

    @property
    def any(self) -> bool:
        return any(a.shape[1] for a in self._arrays())

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return self.user_cat, self.post_cat, self.user_num, self.post_num, self.signals

    def take(self, idx: np.ndarray) -> SideColumns:
        return SideColumns(*(a[idx] for a in self._arrays()), names=self.names)


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
