"""Evaluating retrieval: the posts each user engaged with next, and set metrics over a ranking.

``next_engagement_queries`` cuts one query per user at the start of the evaluation days: the
history is the user's latest impressions before that day (so no evaluation label is visible),
the excluded posts are every post the user saw before it, and the targets are the posts the
user then engaged with (any of ``positive_actions``) on the evaluation days that they had not
seen before (a seen post is excluded from every ranking, so it could never be found).

Rankings are [U, K] post IDs, best first, -1 where a slot is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hashrec.data import InteractionLog, Requests

__all__ = [
    "NextEngagement",
    "count_ranking",
    "next_engagement_queries",
    "popularity_ranking",
    "set_ndcg",
    "set_recall",
]


@dataclass
class NextEngagement:
    """One query per user. ``requests``: history [U, S] log rows (-1 padding), no candidates
    (``candidates`` [U, 1] all -1); ``users`` [U]; ``seen`` and ``targets``: per user, post IDs.
    ``warm`` [U]: the user has impressions before the evaluation days. ``start``: the request
    time (ms), the first evaluation impression: histories, exclusions and any corpus or
    popularity a method uses come from rows before it."""

    users: np.ndarray
    requests: Requests
    seen: list[np.ndarray]
    targets: list[np.ndarray]
    warm: np.ndarray
    start: int = 0

    def __len__(self) -> int:
        return len(self.users)

    def take(self, idx: np.ndarray) -> NextEngagement:
        return NextEngagement(
            self.users[idx],
            self.requests.take(idx),
            [self.seen[i] for i in idx],
            [self.targets[i] for i in idx],
            self.warm[idx],
            self.start,
        )


def next_engagement_queries(
    log: InteractionLog,
    eval_mask: np.ndarray,
    positive_actions: tuple[str, ...],
    history_len: int,
) -> NextEngagement:
    """Queries of every user with an unseen engaged post among the ``eval_mask`` rows."""
    unknown = [a for a in positive_actions if a not in log.actions]
    if unknown:
        raise ValueError(f"positive actions {unknown} are not in the log's actions {log.actions}")
    if not eval_mask.any():
        raise ValueError("no evaluation rows")
    cols = [log.actions.index(a) for a in positive_actions]
    start = int(log.time[eval_mask].min())
    before = log.time < start
    engaged = eval_mask & (log.labels[:, cols] > 0).any(axis=1)
    users = np.unique(log.user[engaged])
    order = np.lexsort((log.time, log.user))  # by user, then time
    u_sorted = log.user[order]
    lo = np.searchsorted(u_sorted, users, side="left")
    hi = np.searchsorted(u_sorted, users, side="right")
    keep, seen, targets, hist, user_row, warm = [], [], [], [], [], []
    for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
        rows = order[a:b]
        past = rows[before[rows]]
        s = np.unique(log.post[past])
        t = np.setdiff1d(np.unique(log.post[rows[engaged[rows]]]), s)
        if len(t) == 0:
            continue
        h = past[len(past) - history_len :] if history_len else past[:0]
        keep.append(i)
        seen.append(s)
        targets.append(t)
        hist.append(np.r_[np.full(history_len - len(h), -1, np.int64), h])
        user_row.append(rows[0])
        warm.append(len(past) > 0)
    U = len(keep)
    history = np.stack(hist) if U else np.zeros((0, history_len), np.int64)
    requests = Requests(
        np.asarray(user_row, np.int64),
        history.astype(np.int64),
        np.full((U, 1), -1, np.int64),
        np.zeros((U, 0), np.int64),
    )
    return NextEngagement(users[keep], requests, seen, targets, np.asarray(warm, bool), start)


def count_ranking(
    posts: np.ndarray, counts: np.ndarray, seen: list[np.ndarray], k: int
) -> np.ndarray:
    """posts [N] ranked by counts [N] (most first, ties by ID; posts with count 0 never
    ranked), minus each user's seen posts: [U, k], -1 where none is left.

    >>> count_ranking(np.array([4, 5, 6]), np.array([2, 7, 2]), [np.array([5])], k=3).tolist()
    [[4, 6, -1]]
    """
    keep = counts > 0
    posts, counts = posts[keep], counts[keep]
    ranked = posts[np.lexsort((posts, -counts))]  # most engaged first, ties by ID
    out = np.full((len(seen), k), -1, np.int64)
    for i, s in enumerate(seen):
        top = ranked[~np.isin(ranked, s)][:k]
        out[i, : len(top)] = top
    return out


def popularity_ranking(
    log: InteractionLog,
    train_mask: np.ndarray,
    positive_actions: tuple[str, ...],
    seen: list[np.ndarray],
    k: int,
) -> np.ndarray:
    """The k posts most engaged with on the training rows, unseen by each user: [U, k]."""
    cols = [log.actions.index(a) for a in positive_actions]
    engaged = train_mask & (log.labels[:, cols] > 0).any(axis=1)
    posts, counts = np.unique(log.post[engaged], return_counts=True)
    return count_ranking(posts, counts, seen, k)


def _hits(ranked: np.ndarray, targets: list[np.ndarray], k: int) -> list[np.ndarray]:
    if len(ranked) != len(targets):
        raise ValueError(f"ranked has {len(ranked)} rows, targets {len(targets)}")
    if ranked.shape[1] < k:
        raise ValueError(f"ranked has {ranked.shape[1]} columns, fewer than k = {k}")
    return [np.isin(r[:k], t) & (r[:k] >= 0) for r, t in zip(ranked, targets, strict=True)]


def set_recall(ranked: np.ndarray, targets: list[np.ndarray], k: int) -> float:
    """Mean over users of |top-k ∩ targets| / |targets|.

    >>> set_recall(np.array([[3, 1, 2]]), [np.array([2, 9])], k=3)
    0.5
    """
    hits = _hits(ranked, targets, k)
    return float(np.mean([h.sum() / len(t) for h, t in zip(hits, targets, strict=True)]))


def set_ndcg(ranked: np.ndarray, targets: list[np.ndarray], k: int) -> float:
    """Mean NDCG@k with binary gains; the ideal puts min(k, |targets|) hits first.

    >>> round(set_ndcg(np.array([[3, 2]]), [np.array([2])], k=2), 4)
    0.6309
    """
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    vals = []
    for h, t in zip(_hits(ranked, targets, k), targets, strict=True):
        ideal = disc[: min(k, len(t))].sum()
        vals.append(float((h * disc[: len(h)]).sum() / ideal))
    return float(np.mean(vals))
