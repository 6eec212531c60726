"""Reading logs: CSV (plain or gzipped) and Parquet through pyarrow, the KuaiRand-Pure adapter.

``load_kuairand`` reads the KuaiRand-Pure layout (official file names and columns);
``load_log`` reads any CSV/Parquet log through a ``LogSchema`` column mapping.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np

from hashrec.data.features import (
    SideColumns,
    history_signal,
    post_age_days,
    read_side_table,
    sorted_lookup,
)
from hashrec.data.schema import KUAIRAND_SCHEMA, InteractionLog, LogSchema
from hashrec.data.side_store import Keyed, SideStore

__all__ = [
    "canonical_order",
    "id_column",
    "load_kuairand",
    "load_log",
    "read_columns",
    "sorted_lookup",
]


def read_columns(
    path: str, columns: list[str], kinds: str | dict[str, str] = "iuf"
) -> dict[str, np.ndarray]:
    """Read ``columns`` of a CSV (optionally .gz) or Parquet file; clear errors for bad files.

    ``kinds``: the numpy dtype kinds accepted ("iu" for integer-only columns, "OUS" adds
    strings), for every column or per column name.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty")
    try:
        if path.endswith(".parquet"):
            names = pq.read_schema(path).names
            missing = [c for c in columns if c not in names]
            if missing:
                raise ValueError(f"{path}: missing columns {missing}; it has {names}")
            table = pq.read_table(path, columns=columns)
        else:
            table = pacsv.read_csv(path)
            missing = [c for c in columns if c not in table.column_names]
            if missing:
                raise ValueError(f"{path}: missing columns {missing}; it has {table.column_names}")
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path}: not a readable CSV/Parquet file ({e})") from e
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows")
    out = {}
    for c in columns:
        col = table.column(c)
        if col.null_count:
            raise ValueError(f"{path}: column {c} has {col.null_count} missing values")
        arr = col.to_numpy(zero_copy_only=False)
        ok = kinds if isinstance(kinds, str) else kinds[c]
        if arr.dtype.kind not in ok:
            expected = {"iu": "integers", "iuf": "numbers"}.get(ok, "integers or strings")
            raise ValueError(f"{path}: column {c} has type {col.type}, expected {expected}")
        out[c] = arr
    return out


_MAX_ID = 2**63 - 1


def _value(x: object) -> str:
    """A cell as the user wrote it (numpy scalars as plain Python values)."""
    return repr(x.item() if isinstance(x, np.generic) else x)


_MAX_TIME_MS = 4_102_444_800_000  # 2100-01-01 UTC: later times mean a wrong time_unit
_DAY_MS = 86_400_000


def id_column(path: str, column: str, values: np.ndarray, offset: int = 0) -> np.ndarray:
    """An ID column as int64 IDs in 1 .. 2^63-1 (0 is padding), or a clear error.

    Integer IDs get ``offset`` added and must land in 1 .. 2^63-1: a float (1.5, or an integer
    too large for int64 that the reader turned into a float), a negative ID, one that becomes 0
    (padding) or overflows is refused, naming the column, the row and the value. String IDs are
    hashed by xxh64 (``hashrec.hashing.functions.ids_to_int64``; never 0) and not offset.

    >>> id_column("log.csv", "uid", np.array([0, 5]), offset=1).tolist()
    [1, 6]
    >>> id_column("log.csv", "uid", np.array([1.5, 2.0]))
    Traceback (most recent call last):
    ValueError: log.csv: column uid row 1 holds 1.5: IDs must be integers or strings
    """
    from hashrec.hashing.functions import ids_to_int64

    def refuse(row: int, what: str) -> ValueError:
        return ValueError(f"{path}: column {column} row {row + 1} holds {_value(values[row])}: "
                          f"{what}")  # fmt: skip

    kind = values.dtype.kind
    if kind in "OUS":
        uniq, inverse = np.unique(values.astype(str), return_inverse=True)
        if len(uniq) and uniq[0] == "":
            raise refuse(int(np.flatnonzero(inverse == 0)[0]), "an empty ID")
        return ids_to_int64(uniq)[inverse]
    if kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        row = int(bad[0]) if len(bad) else int(np.argmax(np.abs(values)))
        return_msg = "IDs must be integers or strings"
        if not len(bad):  # integral floats: the reader's type for integers beyond int64
            return_msg += " (a float column of whole numbers: some exceed the int64 range?)"
        raise ValueError(f"{path}: column {column} row {row + 1} holds "
                         f"{_value(values[row])}: {return_msg}")  # fmt: skip
    if kind not in "iu":
        raise ValueError(f"{path}: column {column} has type {values.dtype}, expected integer IDs")
    low, high = 1 - offset, _MAX_ID - offset  # the range that lands in 1 .. 2^63-1
    if kind == "u":
        big = np.flatnonzero(values > np.uint64(high))
        if len(big):
            raise refuse(int(big[0]), f"out of range (IDs + id_offset {offset} must be at "
                                      "most 2^63-1)")  # fmt: skip
        values = values.astype(np.int64)
    bad = np.flatnonzero((values < low) | (values > high))
    if len(bad):
        row = int(bad[0])
        if int(values[row]) + offset == 0:
            hint = (f"with id_offset {offset} it becomes 0, the padding ID (set \"id_offset\": "
                    f"{offset + 1} in the schema if 0 is a real ID)")  # fmt: skip
        elif values[row] < low:
            hint = f"IDs + id_offset {offset} must be >= 1"
        else:
            hint = f"IDs + id_offset {offset} must be at most 2^63-1"
        raise refuse(row, hint)
    return values.astype(np.int64) + offset


def _check_time(path: str, column: str, values: np.ndarray, unit: str) -> np.ndarray:
    """Timestamps -> int64 milliseconds; negative, non-finite or post-2100 values refused."""
    v = values.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(v) | (v < 0))
    if len(bad):
        r = int(bad[0])
        raise ValueError(f"{path}: column {column} row {r + 1} holds {_value(values[r])}: "
                         "times must be finite and >= 0")  # fmt: skip
    scale = 1000 if unit == "s" else 1
    late = np.flatnonzero(v * scale >= _MAX_TIME_MS)
    if len(late):
        r = int(late[0])
        other = "ms" if unit == "s" else "s"
        raise ValueError(
            f"{path}: column {column} row {r + 1} holds {_value(values[r])}, which as time_unit "
            f'{unit!r} is after the year 2100; is the column in {other!r} ("time_unit": '
            f'"{other}")?'
        )
    if values.dtype.kind in "iu":
        return values.astype(np.int64) * scale
    return np.round(v * scale).astype(np.int64)


def _days_from_time(time_ms: np.ndarray) -> np.ndarray:
    uniq, inv = np.unique(time_ms // _DAY_MS, return_inverse=True)
    days = np.array(
        [int(datetime.fromtimestamp(int(d) * 86400, timezone.utc).strftime("%Y%m%d")) for d in uniq]
    )
    return days[inv].astype(np.int32)


def _check_dates(path: str, column: str, dates: np.ndarray, time_ms: np.ndarray) -> np.ndarray:
    """yyyymmdd dates: real calendar days that agree with the timestamps.

    The date drives the split and the time the history order, so they must tell the same story:
    a row's time must fall within a day of its date's UTC day (time zones lie in -12 h .. +14 h;
    KuaiRand's dates are Beijing days, its logging lag reaches ~2 h).
    """
    if dates.dtype.kind not in "iu":
        raise ValueError(f"{path}: column {column} has type {dates.dtype}, expected yyyymmdd "
                         "integers")  # fmt: skip
    uniq, inv = np.unique(dates, return_inverse=True)
    epoch_day = np.empty(len(uniq), np.int64)
    for i, d in enumerate(uniq.tolist()):
        try:
            day = datetime(d // 10000, d // 100 % 100, d % 100, tzinfo=timezone.utc)
            if not 1970 <= day.year < 2100:
                raise ValueError
        except ValueError:
            r = int(np.flatnonzero(dates == d)[0])
            raise ValueError(f"{path}: column {column} row {r + 1} holds {d}: not a date "
                             "yyyymmdd between 1970 and 2099") from None  # fmt: skip
        epoch_day[i] = int(day.timestamp()) // 86400
    start = epoch_day[inv] * _DAY_MS
    off = np.flatnonzero((time_ms < start - _DAY_MS) | (time_ms >= start + 2 * _DAY_MS))
    if len(off):
        r = int(off[0])
        when = datetime.fromtimestamp(int(time_ms[r]) // 1000, timezone.utc)
        raise ValueError(
            f"{path}: row {r + 1}: {column} {int(dates[r])} disagrees with its time "
            f"({when:%Y-%m-%d %H:%M} UTC), more than a day apart ({len(off):,} rows do)"
        )
    return dates.astype(np.int32)


def _post_authors(path: str, posts: np.ndarray, authors: np.ndarray, post_col: str,
                  author_col: str) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Sorted distinct posts and their one author; a post with two authors is refused."""
    pairs = np.unique(np.stack([posts, authors], axis=1), axis=0)
    dup = np.flatnonzero(pairs[1:, 0] == pairs[:-1, 0])
    if len(dup):
        post, a, b = pairs[dup[0], 0], pairs[dup[0], 1], pairs[dup[0] + 1, 1]
        raise ValueError(
            f"{path}: {post_col} {post} is listed with two {author_col} values ({a} and {b}; "
            f"{len(dup):,} posts have several): a post has one author"
        )
    return pairs[:, 0], pairs[:, 1]


def _read_log_file(path: str, schema: LogSchema, authors_known: bool,
                   extra: tuple[str, ...]) -> dict[str, np.ndarray]:  # fmt: skip
    """One log file's columns, IDs and times checked and converted; row numbers are the file's."""
    ids = [schema.user, schema.post] + ([] if authors_known or not schema.author
                                        else [schema.author])  # fmt: skip
    cols = [*ids, schema.time, *(c for _, c, _, _ in schema.label_rules())]
    cols += [c for _, c, _ in schema.continuous] + list(extra)
    if schema.surface:
        cols.append(schema.surface)
    if schema.date:
        cols.append(schema.date)
    cols = list(dict.fromkeys(cols))
    id_set = set(ids)
    kinds = {c: ("iufOUS" if c in id_set else "iuf") for c in cols}
    if schema.surface:
        kinds[schema.surface] = "iu"
    data = read_columns(path, cols, kinds=kinds)
    for c in ids:
        data[c] = id_column(path, c, data[c], schema.id_offset)
    data[schema.time] = _check_time(path, schema.time, data[schema.time], schema.time_unit)
    if schema.date:
        data[schema.date] = _check_dates(path, schema.date, data[schema.date], data[schema.time])
    for c in [c for _, c, _ in schema.continuous] + list(extra):
        bad = np.flatnonzero(~np.isfinite(data[c].astype(np.float64)))
        if len(bad):
            raise ValueError(f"{path}: column {c} row {int(bad[0]) + 1} holds "
                             f"{_value(data[c][bad[0]])}: expected a finite number")  # fmt: skip
    if schema.surface:
        bad = np.flatnonzero(data[schema.surface] < 0)
        if len(bad):
            raise ValueError(f"{path}: column {schema.surface} row {int(bad[0]) + 1} holds "
                             f"{_value(data[schema.surface][bad[0]])}: surfaces are integers "
                             ">= 0")  # fmt: skip
    return data


_OPS = {
    ">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less, "==": np.equal,
}  # fmt: skip


def _column_names(path: str) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return list(pq.read_schema(path).names)
    with pacsv.open_csv(path) as reader:
        return list(reader.schema.names)


def load_log(
    path: str | list[str],
    schema: LogSchema,
    authors: str | None = None,
    extra: tuple[str, ...] = (),
    say: Callable[[str], None] | None = None,
    users: str | None = None,
) -> InteractionLog:
    """Read an interaction log through ``schema``; ``authors`` is a table (post -> author).

    ``path`` may be several files of one log (e.g. KuaiRand's two ``log_standard_*`` files):
    all are read, they must have the same columns, and ``say`` (if given) hears each file's row
    count. Every ID, time, date and label is checked (see ``id_column``); rows come sorted by
    (time, user) with ties in a canonical order, so the result never depends on the input's row
    order.

    ``authors`` is a table keyed by post: its author and the post's side features; ``users``
    a table keyed by user with the user's side features. Side-feature columns come from those
    tables when they have them, else from the log; a declared column found nowhere is skipped
    (side features are optional). An action may be a threshold rule (``"rating >= 4"``); a
    schema with ``author`` None gives every row author 0 (no author tokens).
    """
    rules = schema.label_rules()
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths:
        raise ValueError("load_log: no log file given")
    paths = [str(p) for p in paths]
    if len(paths) > 1:
        for p in paths:
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p}: no such file")
        first = _column_names(paths[0])
        for p in paths[1:]:
            names = _column_names(p)
            if set(names) != set(first):
                raise ValueError(
                    f"{p} and {paths[0]} are files of one log but their columns differ: "
                    f"{sorted(set(names) ^ set(first))} are in only one of them"
                )
    parts = [_read_log_file(p, schema, authors is not None, extra) for p in paths]
    if say is not None:
        for p, d in zip(paths, parts, strict=True):
            say(f"read {p}: {len(d[schema.time]):,} rows")
    data = {c: np.concatenate([d[c] for d in parts]) for c in parts[0]}
    where = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more)"
    post = data[schema.post]
    if not schema.author:
        author = np.zeros_like(post)
    elif authors is not None:
        table = read_columns(authors, [schema.post, schema.author], kinds="iufOUS")
        keys, vals = _post_authors(
            authors,
            id_column(authors, schema.post, table[schema.post], schema.id_offset),
            id_column(authors, schema.author, table[schema.author], schema.id_offset),
            schema.post,
            schema.author,
        )
        pos, found = sorted_lookup(keys, post)
        if not found.all():
            raise ValueError(
                f"{authors}: no {schema.author} for {int((~found).sum())} of {len(post)} "
                f"{schema.post} values (e.g. {int(post[~found][0])})"
            )
        author = vals[pos]
    else:
        author = data[schema.author]
        _post_authors(where, post, author, schema.post, schema.author)
    labels = np.zeros((len(post), len(rules)), np.uint8)
    for a, (_, col, op, threshold) in enumerate(rules):
        if op is None:
            if not np.isin(data[col], (0, 1)).all():
                raise ValueError(
                    f"{where}: action column {col} holds values other than 0/1 (give a rule "
                    f"such as '{col} >= 4' to threshold it)"
                )
            labels[:, a] = data[col]
        else:
            labels[:, a] = _OPS[op](data[col], threshold)
    time = data[schema.time]
    day = data[schema.date] if schema.date else _days_from_time(time)
    cont = (
        np.stack(
            [np.log1p(np.maximum(data[c], 0) / scale) for _, c, scale in schema.continuous], axis=1
        ).astype(np.float32)
        if schema.continuous
        else np.zeros((len(post), 0), np.float32)
    )
    surface = data[schema.surface].astype(np.int64) if schema.surface else np.zeros_like(post)
    log = InteractionLog(
        user=data[schema.user],
        post=post,
        author=author,
        surface=surface,
        time=time,
        day=day,
        labels=labels.astype(np.uint8),
        continuous=cont,
        actions=tuple(a for a, *_ in rules),
        negative_actions=schema.negative_actions,
        continuous_actions=tuple(a for a, _, _ in schema.continuous),
        extra={c: data[c].astype(np.float64) for c in extra},
        side=_side_columns(paths, schema, data, time, authors, users)
        if schema.has_side_features
        else None,
    )
    return log.take(canonical_order(log))


def _side_columns(
    paths: list[str],
    schema: LogSchema,
    data: dict[str, np.ndarray],
    time: np.ndarray,
    posts: str | None,
    users: str | None,
) -> SideColumns:
    """Side features of every log row, from the side tables or the log files (see
    ``load_log``); side-table keys go through the same ID checks and offset as the log's.

    The tables are kept by ID in a ``SideStore`` (``side.store``, what serving looks requests
    up in) and every row's table features are looked up through it, so training and serving
    join the same values; columns read from the log rows go into the store as each ID's latest
    value."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = paths[0]
    signal_cols = [c for _, num, den in schema.history_signals for c in (num, den) if c]
    post, user = data[schema.post], data[schema.user]
    n = len(post)

    def keyed(table: str, key: str, cat: tuple, num: tuple) -> dict[str, Keyed]:
        keys, cats, nums = read_side_table(table, key, cat, num)
        keys = id_column(table, key, keys, schema.id_offset)
        order = np.argsort(keys, kind="stable")
        return {k: Keyed(keys[order], v[order]) for k, v in {**cats, **nums}.items()}

    p_num = (*schema.post_numeric, *((schema.post_time,) if schema.post_time else ()))
    by_post: dict[str, Keyed] = {}  # column -> values by post ID (post table, then log rows)
    by_user: dict[str, Keyed] = {}
    if posts is not None:
        by_post = keyed(posts, schema.post, schema.post_categorical, p_num)
    if users is not None:
        by_user = keyed(users, schema.user, schema.user_categorical, schema.user_numeric)
    names = set(_column_names(path))
    want_cat = [c for c in (*schema.post_categorical, *schema.user_categorical)
                if c in names and c not in by_post and c not in by_user]  # fmt: skip
    want_num = [c for c in (*p_num, *schema.user_numeric) if c in names and c not in by_post
                and c not in by_user]  # fmt: skip
    from_posts = [c for c in signal_cols if c not in names]  # e.g. a duration of the post
    signal_columns: dict[str, Keyed] = {}
    if from_posts and posts is not None:
        signal_columns = keyed(posts, schema.post, (), tuple(from_posts))
    missing = [c for c in from_posts if c not in signal_columns]
    if missing:
        raise ValueError(
            f"{path}: history_signals name columns {missing} found neither in the log nor in "
            "the post table"
        )
    log_signals = [c for c in signal_cols if c in names]
    row: dict[str, np.ndarray] = {}  # columns read from the log rows
    if want_cat or want_num or log_signals:
        cols = list(dict.fromkeys([*want_cat, *want_num, *log_signals]))
        table = pa.concat_tables(
            [pq.read_table(p, columns=cols) if p.endswith(".parquet")
             else pacsv.read_csv(p, convert_options=_include(cols)) for p in paths],
            promote_options="permissive",
        )  # fmt: skip
        _, cats, nums = read_side_table(path, None, tuple(want_cat),
                                        tuple(dict.fromkeys([*want_num, *log_signals])),
                                        table=table)  # fmt: skip
        row = {**cats, **nums}
    if schema.post_time and (schema.post_time in row or schema.post_time in by_post):
        src = path if schema.post_time in row else posts  # the file the column was read from
        if schema.time_unit == "s" and not _is_date_column(path, src, schema.post_time):
            if schema.post_time in row:  # creation times in epoch ms, as the log's
                row[schema.post_time] = row[schema.post_time] * 1000
            else:
                t = by_post[schema.post_time]
                by_post[schema.post_time] = Keyed(t.keys, t.values * 1000)
    for c in [*want_cat, *want_num]:
        if c in row:
            is_post = c in schema.post_categorical or c in p_num
            ids = post if is_post else user
            (by_post if is_post else by_user)[c] = Keyed.latest(ids, row[c], time)
    for c in log_signals:  # a post's own numeric feature (a duration) is its default
        if c in by_post and c in schema.post_numeric:
            signal_columns.setdefault(c, by_post[c])
    declared = lambda d, decl: {k: d[k] for k in decl if k in d}  # noqa: E731 - declared order
    created = by_post.pop(schema.post_time, None) if schema.post_time else None
    store = SideStore(
        user_categorical=declared(by_user, schema.user_categorical),
        user_numeric=declared(by_user, schema.user_numeric),
        post_categorical=declared(by_post, schema.post_categorical),
        post_numeric=declared(by_post, schema.post_numeric),
        post_created=created,
        signals=tuple(schema.history_signals),
        signal_columns=signal_columns,
        request_columns=tuple(dict.fromkeys(log_signals)),
    )

    # every row's features: log-row columns as read, table columns through the store
    def value(c: str, table: dict[str, Keyed], ids: np.ndarray) -> np.ndarray:
        return row[c] if c in row else table[c].lookup(ids)

    pn = {k: value(k, by_post, post) for k in store.post_numeric}
    if created is not None:  # the post's age at the impression, days
        pn["post_age_days"] = post_age_days(
            time, value(schema.post_time, {schema.post_time: created}, post)
        )
    sig_cols = {c: value(c, signal_columns, post) for c in signal_cols}
    signals = {name: history_signal(sig_cols[num], sig_cols[den] if den else None)
               for name, num, den in schema.history_signals}  # fmt: skip
    side = SideColumns.build(
        {k: value(k, by_user, user) for k in store.user_categorical},
        {k: value(k, by_post, post) for k in store.post_categorical},
        {k: value(k, by_user, user) for k in store.user_numeric},
        pn, signals, n,
    )  # fmt: skip
    store.stats = side.stats
    side.raw_signals = {c: row[c] for c in store.request_columns}
    side.store = store
    return side


def _include(cols: list[str]):
    import pyarrow.csv as pacsv

    return pacsv.ConvertOptions(include_columns=cols)


def _is_date_column(path: str, posts: str | None, column: str) -> bool:
    """Whether the post-time column holds date strings (already epoch ms once read)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    src = posts or path
    if src.endswith(".parquet"):
        import pyarrow.parquet as pq

        t = pq.read_schema(src).field(column).type
    else:
        t = pacsv.open_csv(src).schema.field(column).type
    return pa.types.is_string(t) or pa.types.is_date(t) or pa.types.is_timestamp(t)


def canonical_order(log: InteractionLog) -> np.ndarray:
    """Row order by time, then user, then every other column: rows tied on (user, time) come
    in one order whatever order the file listed them in (only identical rows stay tied)."""
    keys = [*(v for _, v in sorted(log.extra.items(), reverse=True))]
    keys += [*log.continuous.T[::-1], *log.labels.T[::-1]]
    keys += [log.day, log.surface, log.author, log.post, log.user, log.time]
    return np.lexsort(keys)


def _find(folder: str, pattern: str, required: bool = True) -> list[str]:
    """Every file matching ``pattern`` .csv / .csv.gz / .parquet; one stem in two forms refused.
    None found: an error, or [] when not ``required``."""
    hits = []
    for ext in (".csv", ".csv.gz", ".parquet"):
        hits += sorted(glob.glob(os.path.join(folder, pattern + ext)))
    if not hits and not required:
        return []
    if not hits:
        raise FileNotFoundError(f"{folder}: no file matching {pattern}.csv[.gz] (KuaiRand layout)")
    stems: dict[str, str] = {}
    for h in hits:
        stem = os.path.basename(h).split(".")[0]
        if stem in stems:
            first = os.path.basename(stems[stem])
            raise ValueError(
                f"{folder}: {first} and {os.path.basename(h)} hold the same data twice; keep one"
            )
        stems[stem] = h
    return sorted(hits)


def load_kuairand(
    folder: str,
    with_random: bool = False,
    say: Callable[[str], None] | None = None,
    side_features: bool = True,
) -> InteractionLog:
    """KuaiRand: every ``log_standard_*`` file (the official KuaiRand-Pure download ships two,
    4_08_to_4_21 and 4_22_to_5_08), plus ``log_random_*`` (randomly exposed videos) only when
    ``with_random``; joined with ``video_features_basic*`` for authors and video features, and
    ``user_features*`` for user features when present (the side features of
    ``KUAIRAND_SCHEMA``; ``side_features=False`` reads none). Keeps ``duration_ms`` for the
    baselines. ``say`` hears each file's row count. License: CC BY-SA 4.0 (Gao et al. 2022)."""
    logs = _find(folder, "log_standard_*")
    if with_random:
        logs += _find(folder, "log_random_*")
    videos = _find(folder, "video_features_basic*")
    if len(videos) > 1:
        raise ValueError(f"{folder}: several video feature tables {videos}: keep one")
    schema, users = KUAIRAND_SCHEMA, None
    if side_features:
        found = _find(folder, "user_features*", required=False)
        users = found[0] if found else None
    else:
        schema = replace(schema, user_categorical=(), user_numeric=(), post_categorical=(),
                         post_numeric=(), post_time=None, history_signals=())  # fmt: skip
    return load_log(logs, schema, authors=videos[0], extra=("duration_ms",), say=say,
                    users=users)  # fmt: skip
