"""The corpus: every post that can be recommended, with its author and popularity.

On a feed whose impressions the platform chooses (KuaiRand), what is shown and engaged with next
is mostly what was active lately: a corpus can be cut to the posts with an impression in the last
``active_days`` before the request time, and popularity counted over the last
``popularity_days``. ``log_prior`` turns the counts into the per-post bias
``weight * log(1 + count)`` that retrieval adds to the two-tower logit (``ExactIndex(bias=)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from hashrec.data import InteractionLog, sorted_lookup

__all__ = ["DAY_MS", "Corpus", "CorpusConfig"]

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Corpus:
    """The posts that can be recommended: post_ids [N] (sorted, unique), author_ids [N],
    popularity [N] (engagements on the log rows it was built from; the cold-start order).

    >>> c = Corpus(np.array([4, 9]), np.array([1, 1]), np.array([3.0, 0.0]))
    >>> len(c), c.positions(np.array([9, 5])).tolist()
    (2, [1])
    """

    post_ids: np.ndarray
    author_ids: np.ndarray
    popularity: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.post_ids)
        if n == 0:
            raise ValueError("the corpus is empty")
        if self.author_ids.shape != (n,) or self.popularity.shape != (n,):
            raise ValueError(
                f"author_ids {self.author_ids.shape} and popularity {self.popularity.shape} "
                f"must have shape ({n},) like post_ids"
            )
        if n > 1 and not bool((self.post_ids[1:] > self.post_ids[:-1]).all()):
            raise ValueError("post_ids must be sorted and unique")

    def __len__(self) -> int:
        return len(self.post_ids)

    @classmethod
    def from_log(
        cls,
        log: InteractionLog,
        mask: np.ndarray | None = None,
        positive_actions: Sequence[str] | None = None,
        before_time: int | None = None,
        active_days: float | None = None,
        popularity_days: float | None = None,
    ) -> Corpus:
        """The posts of the log (each with its latest author) as they stood at ``before_time``.

        ``before_time`` (ms, default: after the log's last row): rows at or after it are not
        read, so a post first shown later is not in the corpus. ``active_days``: only posts
        with an impression in the ``active_days`` x 24 h before ``before_time``. Popularity
        counts the rows in ``mask`` (default all) before ``before_time`` (and within the last
        ``popularity_days`` x 24 h if given) with any of ``positive_actions`` (default: any
        non-negative action).

        >>> z = np.zeros(3, dtype=np.int64)
        >>> log = InteractionLog(user=np.array([1, 1, 2]), post=np.array([5, 6, 7]),
        ...     author=np.ones(3, np.int64), surface=z, time=np.array([0, DAY_MS, 2 * DAY_MS]),
        ...     day=z, labels=np.array([[1], [1], [1]], np.uint8),
        ...     continuous=np.zeros((3, 0), np.float32), actions=("click",))
        >>> c = Corpus.from_log(log, before_time=2 * DAY_MS, active_days=1)
        >>> c.post_ids.tolist(), c.popularity.tolist()  # 5: shown a day before; 7: not yet
        ([6], [1.0])
        """
        for name, v in (("active_days", active_days), ("popularity_days", popularity_days)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 (or None: every day), got {v}")
        end = int(log.time.max()) + 1 if before_time is None else int(before_time)
        before = log.time < end
        shown = before & (
            log.time >= end - active_days * DAY_MS if active_days is not None else True
        )
        if not shown.any():
            raise ValueError(
                f"the corpus is empty: no impression before time {end}"
                + (f" in the last {active_days} days" if active_days is not None else "")
            )
        rows = np.flatnonzero(shown)[::-1]  # latest first: np.unique keeps the latest author
        posts, first = np.unique(log.post[rows], return_index=True)
        authors = log.author[rows][first]
        m = before if mask is None else before & mask
        if popularity_days is not None:
            m = m & (log.time >= end - popularity_days * DAY_MS)
        cols = (
            [log.actions.index(a) for a in positive_actions]
            if positive_actions is not None
            else [i for i, a in enumerate(log.actions) if a not in log.negative_actions]
        )
        engaged = m & (log.labels[:, cols] > 0).any(axis=1)
        pos, found = sorted_lookup(posts, log.post[engaged])
        pop = np.bincount(pos[found], minlength=len(posts)).astype(np.float64)
        return cls(posts, authors, pop)

    def log_prior(self, weight: float) -> np.ndarray:
        """The popularity prior, ``weight * log(1 + popularity)``: [N] float32 (a bias for
        ``ExactIndex``).

        >>> Corpus(np.array([1, 2]), np.array([1, 1]), np.array([0.0, 3.0])).log_prior(0.5).round(3)
        array([0.   , 0.693], dtype=float32)
        """
        if not np.isfinite(weight):
            raise ValueError(f"prior weight must be finite, got {weight}")
        return (weight * np.log1p(self.popularity)).astype(np.float32)

    def positions(self, post_ids: np.ndarray) -> np.ndarray:
        """Corpus positions of the posts in the corpus (others dropped)."""
        pos, found = sorted_lookup(self.post_ids, np.asarray(post_ids, dtype=np.int64))
        return np.unique(pos[found])


@dataclass
class CorpusConfig:
    """What a retriever ranks and the prior it adds, at request time (serving options, not
    training ones): ``active_days`` keeps the posts shown in the last N x 24 h (None: every
    post seen before); ``prior_weight`` beta adds beta * log(1 + engagements in the last
    ``prior_days`` x 24 h (None: all days)) to the two-tower logit cosine / temperature.

    >>> CorpusConfig(prior_weight=0.5, prior_days=1).to_dict()
    {'active_days': None, 'prior_weight': 0.5, 'prior_days': 1}
    """

    active_days: float | None = None
    prior_weight: float = 0.0
    prior_days: float | None = None

    def __post_init__(self) -> None:
        for name in ("active_days", "prior_days"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and v > 0):
                raise ValueError(f"{name} must be > 0 days (or None: every day), got {v!r}")
        if not (isinstance(self.prior_weight, int | float) and np.isfinite(self.prior_weight)):
            raise ValueError(f"prior_weight must be a finite number, got {self.prior_weight!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def corpus(
        self,
        log: InteractionLog,
        positive_actions: Sequence[str] | None = None,
        before_time: int | None = None,
        mask: np.ndarray | None = None,
    ) -> Corpus:
        """``Corpus.from_log`` with this config's window and popularity (the prior's counts)."""
        return Corpus.from_log(log, mask, positive_actions, before_time, self.active_days,
                               self.prior_days)  # fmt: skip
