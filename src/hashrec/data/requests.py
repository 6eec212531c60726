"""Time-ordered requests cut from a log, with no leakage.

A user's candidate impressions are grouped into slates (a new slate starts after a gap of more
than ``slate_window_s``, or when the slate is full). A slate's history is the user's
``history_len`` most recent impressions strictly before the slate's first impression, with their
action labels: nothing at or after the candidates' time is ever visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hashrec.data.schema import InteractionLog

__all__ = ["ExampleConfig", "Requests", "build_requests"]


@dataclass(frozen=True)
class ExampleConfig:
    """How requests are cut from a log.

    >>> ExampleConfig(history_len=8, max_candidates=4).negatives_per_request
    0
    """

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
        if not 0 <= self.slate_window_s < float("inf"):  # also refuses NaN
            raise ValueError(f"slate_window_s must be a finite number >= 0, got "
                             f"{self.slate_window_s}")  # fmt: skip


@dataclass
class Requests:
    """Row indices into an ``InteractionLog`` (-1 = padding).

    history [R, S] oldest -> newest; candidates [R, C] real impressions; negatives [R, Nn]
    sampled rows whose post/author/surface serve as unseen candidates (labels all 0).

    >>> import numpy as np
    >>> r = Requests(user_row=np.array([0, 2]), history=np.array([[-1, 0], [0, 1]]),
    ...              candidates=np.array([[1, -1], [2, -1]]),
    ...              negatives=np.zeros((2, 0), dtype=np.int64))
    >>> len(r), r.take(np.array([1])).history.tolist()
    (2, [[0, 1]])
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
