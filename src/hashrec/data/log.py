"""Interaction logs -> time-ordered requests -> hashed ``RecsysBatch``es.

A log has one row per impression: user, post, author, product surface, time, per-action labels.
``load_kuairand`` reads the KuaiRand-Pure layout (official file names and columns, plain or
gzipped CSV); ``load_log`` reads any CSV/Parquet log through a ``LogSchema`` column mapping.

Requests (``build_requests``): a user's candidate impressions are grouped into slates (a new
slate starts after a gap of more than ``slate_window_s``, or when the slate is full). A slate's
history is the user's ``history_len`` most recent impressions strictly before the slate's first
impression, with their action labels: nothing at or after the candidates' time is ever visible.
Hashing happens here, as in Phoenix's loader.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch

from hashrec.hashing.config import EntityHash, HashConfig
from hashrec.nn.batch import RecsysBatch

__all__ = [
    "KUAIRAND_SCHEMA",
    "ExampleConfig",
    "InteractionLog",
    "LogSchema",
    "Requests",
    "batches",
    "build_requests",
    "collision_free_config",
    "load_kuairand",
    "load_log",
    "read_columns",
    "sorted_lookup",
]


@dataclass(frozen=True)
class LogSchema:
    """Which column holds what. ``actions`` maps action name -> 0/1 label column.

    ``author`` may live in a separate table joined on ``post`` (``load_log(authors=...)``).
    ``date`` (yyyymmdd integers) is optional; without it days come from ``time`` in UTC.
    ``continuous`` maps a continuous action to a column, modelled as log1p(value / scale).
    ``id_offset`` is added to every user/post/author ID, so that a real ID 0 (KuaiRand has one)
    does not become padding.
    """

    user: str = "user_id"
    post: str = "post_id"
    author: str = "author_id"
    surface: str | None = None
    time: str = "time_ms"
    time_unit: str = "ms"
    date: str | None = None
    actions: tuple[tuple[str, str], ...] = (("click", "click"),)
    negative_actions: tuple[str, ...] = ()
    continuous: tuple[tuple[str, str, float], ...] = ()
    id_offset: int = 0

    def __post_init__(self) -> None:
        if self.time_unit not in ("ms", "s"):
            raise ValueError(f"time_unit must be 'ms' or 's', got {self.time_unit!r}")
        if not self.actions:
            raise ValueError("a log schema needs at least one action column")
        names = [a for a, _ in self.actions]
        unknown = set(self.negative_actions) - set(names)
        if unknown:
            raise ValueError(f"negative_actions {sorted(unknown)} are not among actions {names}")

    @classmethod
    def from_dict(cls, d: dict) -> LogSchema:
        d = dict(d)
        if isinstance(d.get("actions"), dict):
            d["actions"] = tuple(d["actions"].items())
        if isinstance(d.get("continuous"), dict):
            d["continuous"] = tuple((k, *v) for k, v in d["continuous"].items())
        for key in ("actions", "continuous"):
            if key in d:
                d[key] = tuple(tuple(x) for x in d[key])
        if "negative_actions" in d:
            d["negative_actions"] = tuple(d["negative_actions"])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown schema fields {sorted(unknown)}")
        return cls(**d)


# KuaiRand-Pure (Gao et al., CIKM 2022): the official column names.
KUAIRAND_SCHEMA = LogSchema(
    user="user_id",
    post="video_id",
    author="author_id",
    surface="tab",
    time="time_ms",
    date="date",
    actions=(
        ("click", "is_click"),
        ("long_view", "long_view"),
        ("like", "is_like"),
        ("follow", "is_follow"),
        ("comment", "is_comment"),
        ("forward", "is_forward"),
        ("hate", "is_hate"),
        ("profile_enter", "is_profile_enter"),
    ),
    negative_actions=("hate",),
    continuous=(("dwell_time", "play_time_ms", 1000.0),),
    id_offset=1,
)


@dataclass
class InteractionLog:
    """A log as column arrays, sorted by time (ties by user). Days are yyyymmdd integers."""

    user: np.ndarray
    post: np.ndarray
    author: np.ndarray
    surface: np.ndarray
    time: np.ndarray  # milliseconds
    day: np.ndarray
    labels: np.ndarray  # [n, A] uint8
    continuous: np.ndarray  # [n, Ac] float32
    actions: tuple[str, ...]
    negative_actions: tuple[str, ...] = ()
    continuous_actions: tuple[str, ...] = ()
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. duration for baselines

    def __len__(self) -> int:
        return len(self.user)

    def take(self, idx: np.ndarray) -> InteractionLog:
        """Rows ``idx`` (a bool mask or indices), same columns."""
        return InteractionLog(
            self.user[idx], self.post[idx], self.author[idx], self.surface[idx], self.time[idx],
            self.day[idx], self.labels[idx], self.continuous[idx], self.actions,
            self.negative_actions, self.continuous_actions,
            {k: v[idx] for k, v in self.extra.items()},
        )  # fmt: skip

    def days(self, start: int | None = None, end: int | None = None) -> np.ndarray:
        """Bool mask of rows with start <= day <= end (yyyymmdd; None = open)."""
        m = np.ones(len(self), dtype=bool)
        if start is not None:
            m &= self.day >= start
        if end is not None:
            m &= self.day <= end
        return m


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


@dataclass(frozen=True)
class ExampleConfig:
    """How requests are cut from a log."""

    history_len: int = 32
    max_candidates: int = 16
    slate_window_s: float = 3600.0
    negatives_per_request: int = 0

    def __post_init__(self) -> None:
        if self.history_len < 0 or self.max_candidates < 1 or self.negatives_per_request < 0:
            raise ValueError(
                f"need history_len >= 0, max_candidates >= 1, negatives_per_request >= 0; got "
                f"{self.history_len}, {self.max_candidates}, {self.negatives_per_request}"
            )


@dataclass
class Requests:
    """Row indices into an ``InteractionLog`` (-1 = padding).

    history [R, S] oldest -> newest; candidates [R, C] real impressions; negatives [R, Nn]
    sampled rows whose post/author/surface serve as unseen candidates (labels all 0).
    """

    user_row: np.ndarray
    history: np.ndarray
    candidates: np.ndarray
    negatives: np.ndarray

    def __len__(self) -> int:
        return len(self.user_row)

    def take(self, idx: np.ndarray) -> Requests:
        return Requests(self.user_row[idx], self.history[idx], self.candidates[idx],
                        self.negatives[idx])  # fmt: skip


def build_requests(
    log: InteractionLog,
    candidate_mask: np.ndarray,
    config: ExampleConfig,
    negative_pool: np.ndarray | None = None,
    seed: int = 0,
) -> Requests:
    """Slates of the rows in ``candidate_mask`` with their strictly-earlier histories.

    A user's candidate impressions (in time order) start a new slate when the gap to the
    previous one exceeds ``slate_window_s`` or the slate holds ``max_candidates``. History rows
    may be any earlier rows of the log (e.g. training days, for evaluation). ``negative_pool``:
    rows to sample negatives from (popularity-weighted by construction). Vectorised.
    """
    S, C = config.history_len, config.max_candidates
    order = np.lexsort((log.time, log.user))  # by user, then time
    users, times = log.user[order], log.time[order]
    n = len(order)
    new_user = np.r_[True, users[1:] != users[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    # first position of each (user, time) group: history ends strictly before it
    new_time = new_user | np.r_[True, times[1:] != times[:-1]]
    time_start = np.maximum.accumulate(np.where(new_time, np.arange(n), 0))

    cpos = np.flatnonzero(candidate_mask[order])  # candidate positions, user/time order
    if len(cpos) == 0:
        empty = np.zeros((0, S), np.int64), np.zeros((0, C), np.int64)
        return Requests(
            np.zeros(0, np.int64), *empty, np.zeros((0, config.negatives_per_request), np.int64)
        )
    cu = users[cpos]
    gap_break = np.r_[
        True, (cu[1:] != cu[:-1]) | (np.diff(times[cpos]) > config.slate_window_s * 1000)
    ]
    session = np.cumsum(gap_break) - 1
    rank = np.arange(len(cpos)) - np.flatnonzero(gap_break)[session]  # position in the session
    slate_break = gap_break | (rank % C == 0)
    slate = np.cumsum(slate_break) - 1
    col = np.arange(len(cpos)) - np.flatnonzero(slate_break)[slate]
    R = int(slate[-1]) + 1
    candidates = np.full((R, C), -1, dtype=np.int64)
    candidates[slate, col] = order[cpos]
    first = cpos[slate_break]  # sorted position of each slate's first candidate
    end = time_start[first]  # history = positions [max(user_start, end - S), end)
    pos = end[:, None] - S + np.arange(S)
    ok = pos >= user_start[first][:, None]
    history = np.where(ok, order[np.clip(pos, 0, n - 1)], -1)

    Nn = config.negatives_per_request
    negatives = np.full((R, Nn), -1, dtype=np.int64)
    if Nn:
        if negative_pool is None or len(negative_pool) == 0:
            raise ValueError("negatives_per_request > 0 needs a non-empty negative_pool")
        rng = np.random.default_rng(seed)
        negatives = negative_pool[rng.integers(0, len(negative_pool), (R, Nn))]
    return Requests(order[first], history, candidates, negatives)


def collision_free_config(log: InteractionLog, reserved_rows: int = 64) -> tuple[HashConfig, dict]:
    """One row per distinct ID (the 'full table' baseline): identity hashing of dense IDs.

    Returns the config and ``{entity: sorted raw IDs}``; ``dense_ids`` maps raw -> 1..n.
    """
    vocab = {
        "user": np.unique(log.user),
        "post": np.unique(log.post),
        "author": np.unique(log.author),
    }
    ents = tuple(EntityHash(name, 1, len(v) + 1, "identity") for name, v in vocab.items())
    return HashConfig(entities=ents, reserved_rows=reserved_rows), vocab


def dense_ids(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Raw IDs -> 1..len(vocab) by position in the sorted vocabulary (0 stays 0)."""
    pos, found = sorted_lookup(vocab, ids)
    if not found[ids != 0].all():
        raise ValueError("dense_ids: an ID is missing from the vocabulary")
    return np.where(ids == 0, 0, pos + 1)


class RowHashes:
    """Fused-table rows of every log row's user, post and author, hashed once."""

    def __init__(self, log: InteractionLog, config: HashConfig, vocab: dict | None = None):
        def ids(entity: str, raw: np.ndarray) -> np.ndarray:
            return dense_ids(vocab[entity], raw) if vocab is not None else raw

        self.user = config.rows("user", ids("user", log.user))
        self.post = config.rows("post", ids("post", log.post))
        self.author = config.rows("author", ids("author", log.author))


def _gather(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """table[idx] with -1 -> zeros."""
    out = table[np.maximum(idx, 0)]
    out[idx < 0] = 0
    return out


def batches(
    log: InteractionLog,
    hashes: RowHashes,
    requests: Requests,
    batch_size: int,
    order: np.ndarray | None = None,
) -> Iterator[tuple[RecsysBatch, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]]:
    """Yield (batch, labels [B,C,A], label_mask [B,C,A], continuous [B,C,Ac], candidate rows).

    Candidates are the real impressions then the sampled negatives; on a sampled negative every
    label is 0 and negative-feedback actions carry no loss (it was never shown, so it cannot
    have been hated). ``candidate rows`` [B, C] maps predictions back to log rows (-1 otherwise).
    """
    idx_all = np.arange(len(requests)) if order is None else order
    neg_cols = np.array([a in log.negative_actions for a in log.actions])
    for lo in range(0, len(idx_all), batch_size):
        r = requests.take(idx_all[lo : lo + batch_size])
        cand = np.concatenate([r.candidates, r.negatives], axis=1)  # [B, C]
        is_neg = np.zeros(cand.shape, dtype=bool)
        is_neg[:, r.candidates.shape[1] :] = r.negatives >= 0
        batch = RecsysBatch(
            user_hashes=torch.from_numpy(hashes.user[r.user_row]),
            history_post_hashes=torch.from_numpy(_gather(hashes.post, r.history)),
            history_author_hashes=torch.from_numpy(_gather(hashes.author, r.history)),
            history_actions=torch.from_numpy(_gather(log.labels, r.history)),
            history_product_surface=torch.from_numpy(_gather(log.surface, r.history)),
            candidate_post_hashes=torch.from_numpy(_gather(hashes.post, cand)),
            candidate_author_hashes=torch.from_numpy(_gather(hashes.author, cand)),
            candidate_product_surface=torch.from_numpy(_gather(log.surface, cand)),
        )
        labels = _gather(log.labels, cand)
        labels[is_neg] = 0
        label_mask = np.ones(labels.shape, dtype=bool)
        label_mask[is_neg[..., None] & neg_cols] = False
        cont = _gather(log.continuous, cand)
        cont[is_neg] = 0.0
        rows = np.where(is_neg, -1, cand)
        yield (batch, torch.from_numpy(labels).float(), torch.from_numpy(label_mask),
               torch.from_numpy(cont), rows)  # fmt: skip
