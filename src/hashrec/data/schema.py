"""What a log holds: ``LogSchema`` (which column is what), ``InteractionLog`` (the rows)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from hashrec.data.features import SideColumns

__all__ = ["KUAIRAND_SCHEMA", "InteractionLog", "LogSchema"]


@dataclass(frozen=True)
class LogSchema:
    """Which column holds what. ``actions`` maps action name -> 0/1 label column, or to a
    threshold rule on a numeric column (``"rating >= 4"``; operators >=, >, <=, <, ==).

    ``author`` may live in a separate table joined on ``post`` (``load_log(authors=...)``), or be
    ``None``: a log without authors trains without author tokens.
    ``date`` (yyyymmdd integers) is optional; without it days come from ``time`` in UTC.
    ``continuous`` maps a continuous action to a column, modelled as log1p(value / scale).
    ``id_offset`` is added to every user/post/author ID, so that a real ID 0 (KuaiRand has one)
    does not become padding.

    Side features (all optional; see ``hashrec.data.features``): ``user_categorical`` /
    ``post_categorical`` columns are hashed into the fused table's ``feature`` block and
    reduced into the user / post tokens; ``user_numeric`` / ``post_numeric`` columns are
    log-scaled (and bucketised into extra categorical values); ``post_time`` (the post's
    creation time: a date string or a timestamp in ``time_unit``) gives the post's age at each
    impression; ``history_signals`` (name, column, denominator column or "") are continuous
    signals of history events, log1p(column / denominator), e.g. play time / duration. Side
    columns come from the log, or from the ``posts=`` / ``users=`` tables of ``load_log``.

    >>> LogSchema(actions={"like": "rating >= 4"}, author=None).label_rules()
    (('like', 'rating', '>=', 4.0),)
    >>> s = LogSchema.from_dict({"user": "uid", "post": "item", "actions": {"click": "clicked"}})
    >>> s.user, s.actions
    ('uid', (('click', 'clicked'),))
    """

    user: str = "user_id"
    post: str = "post_id"
    author: str | None = "author_id"
    surface: str | None = None
    time: str = "time_ms"
    time_unit: str = "ms"
    date: str | None = None
    actions: tuple[tuple[str, str], ...] = (("click", "click"),)
    negative_actions: tuple[str, ...] = ()
    continuous: tuple[tuple[str, str, float], ...] = ()
    id_offset: int = 0
    user_categorical: tuple[str, ...] = ()
    user_numeric: tuple[str, ...] = ()
    post_categorical: tuple[str, ...] = ()
    post_numeric: tuple[str, ...] = ()
    post_time: str | None = None
    history_signals: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.actions, dict):
            object.__setattr__(self, "actions", tuple(self.actions.items()))
        for name in ("user_categorical", "user_numeric", "post_categorical", "post_numeric"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} must be a list of column names, got the string {value!r}")
            object.__setattr__(self, name, tuple(value))
        signals = tuple(tuple(s) + ("",) * (3 - len(s)) for s in self.history_signals)
        if any(len(s) != 3 for s in signals):
            raise ValueError(
                f"history_signals entries are (name, column, denominator), got {signals}"
            )
        object.__setattr__(self, "history_signals", signals)
        self.label_rules()  # a malformed rule fails here, at the boundary
        for name in ("user", "post", "time", "time_unit"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"schema field {name!r} must be a column name (a non-empty "
                                 f"string), got {getattr(self, name)!r}")  # fmt: skip
        for name in ("author", "surface", "date"):
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
            if "history_signals" in d:
                d["history_signals"] = tuple(tuple(x) for x in d["history_signals"])
        except TypeError as e:
            raise ValueError(f"schema: bad actions/continuous/negative_actions ({e})") from e
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown schema fields {sorted(unknown)}")
        return cls(**d)

    def label_rules(self) -> tuple[tuple[str, str, str | None, float | None], ...]:
        """(action, column, operator, threshold) per action; operator None = a 0/1 column."""
        rules = []
        for action, spec in self.actions:
            m = _RULE.match(spec)
            if m is None:
                if not spec or any(op in spec for op in ("<", ">", "=")):
                    raise ValueError(
                        f"action {action!r}: expected a column name or a rule like "
                        f"'rating >= 4', got {spec!r}"
                    )
                rules.append((action, spec, None, None))
            else:
                rules.append((action, m.group(1), m.group(2), float(m.group(3))))
        return tuple(rules)

    @property
    def has_side_features(self) -> bool:
        return bool(self.user_categorical or self.user_numeric or self.post_categorical
                    or self.post_numeric or self.post_time or self.history_signals)  # fmt: skip


_RULE = re.compile(
    r"^\s*([^<>=\s]+)\s*(>=|<=|==|>|<)\s*(-?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$"
)


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
    # side features (Gao et al. 2022, video_features_basic / user_features): used when present
    post_categorical=("video_type", "upload_type", "music_type", "music_id", "tag"),
    post_numeric=("duration_ms",),
    post_time="upload_dt",
    user_categorical=(
        "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
        "follow_user_num_range", "fans_user_num_range", "friend_user_num_range",
        "register_days_range", *(f"onehot_feat{i}" for i in range(18)),
    ),
    user_numeric=("follow_user_num", "fans_user_num", "friend_user_num", "register_days"),
    history_signals=(
        ("play_ratio", "play_time_ms", "duration_ms"), ("play_time", "play_time_ms", ""),
    ),
)  # fmt: skip


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
    side: SideColumns | None = None  # side features (``hashrec.data.features``)

    def __post_init__(self) -> None:
        if self.side is None:
            self.side = SideColumns.empty(len(self.user))

    def __len__(self) -> int:
        return len(self.user)

    def take(self, idx: np.ndarray) -> InteractionLog:
        """Rows ``idx`` (a bool mask or indices), same columns."""
        return InteractionLog(
            self.user[idx], self.post[idx], self.author[idx], self.surface[idx], self.time[idx],
            self.day[idx], self.labels[idx], self.continuous[idx], self.actions,
            self.negative_actions, self.continuous_actions,
            {k: v[idx] for k, v in self.extra.items()}, self.side.take(idx),
        )  # fmt: skip

    def days(self, start: int | None = None, end: int | None = None) -> np.ndarray:
        """Bool mask of rows with start <= day <= end (yyyymmdd; None = open)."""
        m = np.ones(len(self), dtype=bool)
        if start is not None:
            m &= self.day >= start
        if end is not None:
            m &= self.day <= end
        return m
