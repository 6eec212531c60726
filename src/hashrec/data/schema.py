"""What a log holds: ``LogSchema`` (which column is what), ``InteractionLog`` (the rows)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["KUAIRAND_SCHEMA", "InteractionLog", "LogSchema"]


@dataclass(frozen=True)
class LogSchema:
    """Which column holds what. ``actions`` maps action name -> 0/1 label column.

    ``author`` may live in a separate table joined on ``post`` (``load_log(authors=...)``).
    ``date`` (yyyymmdd integers) is optional; without it days come from ``time`` in UTC.
    ``continuous`` maps a continuous action to a column, modelled as log1p(value / scale).
    ``id_offset`` is added to every user/post/author ID, so that a real ID 0 (KuaiRand has one)
    does not become padding.

    >>> s = LogSchema.from_dict({"user": "uid", "post": "item", "actions": {"click": "clicked"}})
    >>> s.user, s.actions
    ('uid', (('click', 'clicked'),))
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
        for name in ("user", "post", "author", "time", "time_unit"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"schema field {name!r} must be a column name (a non-empty "
                                 f"string), got {getattr(self, name)!r}")  # fmt: skip
        for name in ("surface", "date"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"schema field {name!r} must be a column name or null, got "
                                 f"{getattr(self, name)!r}")  # fmt: skip
        if self.time_unit not in ("ms", "s"):
            raise ValueError(f"time_unit must be 'ms' or 's', got {self.time_unit!r}")
        if not isinstance(self.id_offset, int) or isinstance(self.id_offset, bool):
            raise ValueError(f"id_offset must be an integer, got {self.id_offset!r}")
        if not 0 <= self.id_offset < 2**62:
            raise ValueError(f"id_offset must be in [0, 2^62), got {self.id_offset}")
        if not self.actions:
            raise ValueError("a log schema needs at least one action column")
        for pair in self.actions:
            if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise ValueError(f"actions: expected action name -> column name, got {pair!r}")
        for triple in self.continuous:
            ok = len(triple) == 3 and all(isinstance(x, str) for x in triple[:2])
            if not ok or not isinstance(triple[2], int | float) or not triple[2] > 0:
                raise ValueError(f"continuous: expected action -> [column, scale > 0], got "
                                 f"{triple!r}")  # fmt: skip
        names = [a for a, _ in self.actions]
        unknown = set(self.negative_actions) - set(names)
        if unknown:
            raise ValueError(f"negative_actions {sorted(unknown)} are not among actions {names}")

    @classmethod
    def from_dict(cls, d: dict) -> LogSchema:
        """A schema from its JSON form (``actions``/``continuous`` may be objects).

        >>> LogSchema.from_dict({"post": "item", "actions": {"click": "clicked"}}).actions
        (('click', 'clicked'),)
        """
        if not isinstance(d, dict):
            raise ValueError(f"a schema is a JSON object (column mapping), got {type(d).__name__}")
        d = dict(d)
        try:
            if isinstance(d.get("actions"), dict):
                d["actions"] = tuple(d["actions"].items())
            if isinstance(d.get("continuous"), dict):
                d["continuous"] = tuple((k, *v) for k, v in d["continuous"].items())
            for key in ("actions", "continuous"):
                if key in d:
                    d[key] = tuple(tuple(x) for x in d[key])
            if "negative_actions" in d:
                if isinstance(d["negative_actions"], str):
                    raise TypeError("a list of action names")
                d["negative_actions"] = tuple(d["negative_actions"])
        except TypeError as e:
            raise ValueError(f"schema: bad actions/continuous/negative_actions ({e})") from e
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
    """A log as column arrays, sorted by time (ties by user). Days are yyyymmdd integers.

    >>> import numpy as np
    >>> log = InteractionLog(
    ...     user=np.array([1, 1, 2, 1]), post=np.array([10, 11, 10, 12]),
    ...     author=np.array([5, 6, 5, 6]), surface=np.zeros(4, dtype=np.int64),
    ...     time=np.array([0, 1000, 2000, 9000]), day=np.full(4, 20220425),
    ...     labels=np.array([[1], [0], [1], [1]], dtype=np.uint8),
    ...     continuous=np.zeros((4, 0), dtype=np.float32), actions=("click",))
    >>> len(log), int(log.days(20220425, 20220425).sum()), len(log.take(log.user == 2))
    (4, 4, 1)
    """

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
