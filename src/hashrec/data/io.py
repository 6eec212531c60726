"""Reading logs: CSV (plain or gzipped) and Parquet through pyarrow, the KuaiRand-Pure adapter.

``load_kuairand`` reads the KuaiRand-Pure layout (official file names and columns);
``load_log`` reads any CSV/Parquet log through a ``LogSchema`` column mapping.
"""

from __future__ import annotations

import glob
import os
from datetime import datetime, timezone

import numpy as np

from hashrec.data.schema import KUAIRAND_SCHEMA, InteractionLog, LogSchema

__all__ = ["load_kuairand", "load_log", "read_columns", "sorted_lookup"]


def read_columns(path: str, columns: list[str], kinds: str = "iuf") -> dict[str, np.ndarray]:
    """Read ``columns`` of a CSV (optionally .gz) or Parquet file; clear errors for bad files.

    ``kinds``: the numpy dtype kinds accepted ("iu" for integer-only columns such as IDs).
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
        arr = col.to_numpy()
        if arr.dtype.kind not in kinds:
            expected = "integers" if kinds == "iu" else "numbers"
            raise ValueError(f"{path}: column {c} has type {col.type}, expected {expected}")
        out[c] = arr
    return out


def sorted_lookup(keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``query`` in the sorted array ``keys`` and whether each was found."""
    if len(keys) == 0:
        return np.zeros(len(query), dtype=np.int64), np.zeros(len(query), dtype=bool)
    pos = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
    return pos, keys[pos] == query


def _days_from_time(time_ms: np.ndarray) -> np.ndarray:
    uniq, inv = np.unique(time_ms // 86_400_000, return_inverse=True)
    days = np.array(
        [int(datetime.fromtimestamp(int(d) * 86400, timezone.utc).strftime("%Y%m%d")) for d in uniq]
    )
    return days[inv].astype(np.int32)


def load_log(
    path: str, schema: LogSchema, authors: str | None = None, extra: tuple[str, ...] = ()
) -> InteractionLog:
    """Read an interaction log through ``schema``; ``authors`` is a table (post -> author)."""
    cols = [schema.user, schema.post, schema.time, *(c for _, c in schema.actions)]
    cols += [c for _, c, _ in schema.continuous] + list(extra)
    if schema.surface:
        cols.append(schema.surface)
    if schema.date:
        cols.append(schema.date)
    if authors is None:
        cols.append(schema.author)
    data = read_columns(path, list(dict.fromkeys(cols)))
    post = data[schema.post].astype(np.int64)
    if authors is not None:
        table = read_columns(authors, [schema.post, schema.author])
        keys, vals = table[schema.post].astype(np.int64), table[schema.author].astype(np.int64)
        order = np.argsort(keys)
        keys, vals = keys[order], vals[order]
        pos, found = sorted_lookup(keys, post)
        if not found.all():
            raise ValueError(
                f"{authors}: no {schema.author} for {int((~found).sum())} of {len(post)} "
                f"{schema.post} values (e.g. {int(post[~found][0])})"
            )
        author = vals[pos]
    else:
        author = data[schema.author].astype(np.int64)
    labels = np.stack([data[c] for _, c in schema.actions], axis=1)
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        col = schema.actions[int(np.nonzero(bad.any(0))[0][0])][1]
        raise ValueError(f"{path}: action column {col} holds values other than 0/1")
    time = data[schema.time].astype(np.int64) * (1000 if schema.time_unit == "s" else 1)
    day = data[schema.date].astype(np.int32) if schema.date else _days_from_time(time)
    cont = (
        np.stack(
            [np.log1p(np.maximum(data[c], 0) / scale) for _, c, scale in schema.continuous], axis=1
        ).astype(np.float32)
        if schema.continuous
        else np.zeros((len(post), 0), np.float32)
    )
    surface = data[schema.surface].astype(np.int64) if schema.surface else np.zeros_like(post)
    off = schema.id_offset
    log = InteractionLog(
        user=data[schema.user].astype(np.int64) + off,
        post=post + off,
        author=author + off,
        surface=surface,
        time=time,
        day=day,
        labels=labels.astype(np.uint8),
        continuous=cont,
        actions=tuple(a for a, _ in schema.actions),
        negative_actions=schema.negative_actions,
        continuous_actions=tuple(a for a, _, _ in schema.continuous),
        extra={c: data[c].astype(np.float64) for c in extra},
    )
    if surface.min() < 0:
        raise ValueError(f"{path}: column {schema.surface} has negative values")
    return log.take(np.lexsort((log.user, log.time)))


def _find(folder: str, pattern: str) -> str:
    hits = sorted(glob.glob(os.path.join(folder, pattern + ".csv")))
    hits += sorted(glob.glob(os.path.join(folder, pattern + ".csv.gz")))
    if not hits:
        raise FileNotFoundError(f"{folder}: no file matching {pattern}.csv[.gz] (KuaiRand layout)")
    return hits[0]


def load_kuairand(folder: str) -> InteractionLog:
    """KuaiRand-Pure: ``log_standard_*.csv[.gz]`` joined with ``video_features_basic*`` for
    authors. Keeps ``duration_ms`` for the baselines. License: CC BY-SA 4.0 (Gao et al. 2022)."""
    return load_log(
        _find(folder, "log_standard_*"),
        KUAIRAND_SCHEMA,
        authors=_find(folder, "video_features_basic*"),
        extra=("duration_ms",),
    )
