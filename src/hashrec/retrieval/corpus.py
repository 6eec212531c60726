"""The corpus: every post that can be recommended, with its author and popularity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hashrec.data import InteractionLog, sorted_lookup

__all__ = ["Corpus"]


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
    ) -> Corpus:
        """Every distinct post of the log (each with its latest author); popularity counts the
        rows in ``mask`` (default all) with any of ``positive_actions`` (default any action)."""
        posts, first = np.unique(log.post[::-1], return_index=True)
        authors = log.author[::-1][first]
        m = np.ones(len(log), dtype=bool) if mask is None else mask
        cols = (
            [log.actions.index(a) for a in positive_actions]
            if positive_actions is not None
            else [i for i, a in enumerate(log.actions) if a not in log.negative_actions]
        )
        engaged = m & (log.labels[:, cols] > 0).any(axis=1)
        pos, _ = sorted_lookup(posts, log.post[engaged])
        pop = np.bincount(pos, minlength=len(posts)).astype(np.float64)
        return cls(posts, authors, pop)

    def positions(self, post_ids: np.ndarray) -> np.ndarray:
        """Corpus positions of the posts in the corpus (others dropped)."""
        pos, found = sorted_lookup(self.post_ids, np.asarray(post_ids, dtype=np.int64))
        return np.unique(pos[found])
