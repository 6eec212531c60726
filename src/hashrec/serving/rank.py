"""Ranking one raw request: raw IDs -> hashed ``RecsysBatch`` -> ``PhoenixRanker`` -> scores.

This is the library-level path behind ``POST /rank`` (the HTTP layer only validates and
batches): a ``RankQuery`` holds one request's raw IDs (unhashed user, post and author IDs as the
model was trained on), its history events with their actions and surfaces, and its candidates.
``RequestRanker`` hashes them with the model's own ``HashConfig``, runs the ranker in eval mode
and applies the ``WeightedScorer``.

Layout, as in training (``hashrec.data.requests``): the history is oldest -> newest and left-padded
to ``history_len`` events, so an event's position relative to the candidates does not depend on
how many events a request carries or on the other requests of a batch; candidates are
right-padded to the longest slate of the batch. Candidates never see each other (candidate
isolation), so a candidate's scores do not depend on the batch it was scored in.

A ranker trained with side features takes them from a ``SideStore`` (the side tables of the log
it was trained on, ``hashrec.data.side_store``): the user's and the candidates' features by ID,
the candidates' ages at their impression time (``candidate_times_ms``) and the history events'
signals (``history_signals``, e.g. KuaiRand's play time), computed as training computes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hashrec.data.side_store import SideStore, left_padded_history, side_batch
from hashrec.models.ensemble import RankerEnsemble
from hashrec.models.ranker import PhoenixRanker
from hashrec.models.scoring import ScoringConfig, WeightedScorer
from hashrec.nn.batch import RecsysBatch
from hashrec.nn.side import SideBatch
from hashrec.serving.pipeline import check_side_store, scoring_config

__all__ = ["RankQuery", "RankResult", "RequestRanker", "to_batch", "to_side_batch"]


def _ids(name: str, value: Sequence[int] | np.ndarray, length: int | None = None) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype == object or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    a = a.astype(np.int64).reshape(-1) if a.size else np.zeros(0, np.int64)
    if length is not None and len(a) != length:
        raise ValueError(f"{name} has {len(a)} entries, expected {length}")
    return a


@dataclass(frozen=True)
class RankQuery:
    """One raw ranking request (IDs unhashed; 0 is not an ID, it means padding).

    Shapes: history_* [S] and history_actions [S, A] (multi-hot over the model's actions;
    [S, 0] or None: no action set), oldest -> newest; candidate_* [C]. Surfaces index the
    product-surface table (default 0). For a ranker with side features: ``history_signals``
    maps a signal column (e.g. ``play_time_ms``) to its raw value per event [S] (NaN: not
    known), ``candidate_times_ms`` [C] is each candidate's impression time (epoch ms).

    >>> q = RankQuery(7, candidate_post_ids=[11, 12], candidate_author_ids=[3, 3])
    >>> q.history_len, q.num_candidates, q.candidate_surfaces.tolist()
    (0, 2, [0, 0])
    """

    user_id: int
    candidate_post_ids: np.ndarray
    candidate_author_ids: np.ndarray
    candidate_surfaces: np.ndarray | None = None
    history_post_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    history_author_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    history_actions: np.ndarray | None = None
    history_surfaces: np.ndarray | None = None
    history_signals: Mapping[str, np.ndarray] | None = None
    candidate_times_ms: np.ndarray | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalise once, here
        put(self, "user_id", int(self.user_id))
        put(self, "candidate_post_ids", _ids("candidate_post_ids", self.candidate_post_ids))
        C = len(self.candidate_post_ids)
        put(
            self, "candidate_author_ids", _ids("candidate_author_ids", self.candidate_author_ids, C)
        )
        surf = np.zeros(C, np.int64) if self.candidate_surfaces is None else self.candidate_surfaces
        put(self, "candidate_surfaces", _ids("candidate_surfaces", surf, C))
        put(self, "history_post_ids", _ids("history_post_ids", self.history_post_ids))
        S = len(self.history_post_ids)
        put(self, "history_author_ids", _ids("history_author_ids", self.history_author_ids, S))
        surf = np.zeros(S, np.int64) if self.history_surfaces is None else self.history_surfaces
        put(self, "history_surfaces", _ids("history_surfaces", surf, S))
        acts = (
            np.zeros((S, 0), np.float32) if self.history_actions is None else self.history_actions
        )
        acts = np.asarray(acts, dtype=np.float32)
        if acts.ndim != 2 or acts.shape[0] != S:
            raise ValueError(f"history_actions has shape {list(acts.shape)}, expected [{S}, A]")
        put(self, "history_actions", acts)
        signals = {}
        for col, v in (self.history_signals or {}).items():
            x = np.asarray(v, dtype=np.float64).reshape(-1)
            if len(x) != S:
                raise ValueError(f"history_signals[{col!r}] has {len(x)} values, expected {S}")
            signals[str(col)] = x
        put(self, "history_signals", signals)
        if self.candidate_times_ms is not None:
            put(self, "candidate_times_ms",
                _ids("candidate_times_ms", self.candidate_times_ms, C))  # fmt: skip
        if C == 0:
            raise ValueError("candidate_post_ids is empty, expected at least one candidate")
        for name in ("candidate_post_ids", "candidate_author_ids", "history_post_ids",
                     "history_author_ids"):  # fmt: skip
            a = getattr(self, name)
            if a.size and int(a.min()) <= 0:
                raise ValueError(f"{name} holds {int(a.min())}, expected IDs >= 1")
        if self.user_id <= 0:
            raise ValueError(f"user_id is {self.user_id}, expected an ID >= 1")

    @property
    def history_len(self) -> int:
        return len(self.history_post_ids)

    @property
    def num_candidates(self) -> int:
        return len(self.candidate_post_ids)


@dataclass(frozen=True)
class RankResult:
    """One request's predictions in candidate order.

    probs [C, A] (sigmoid of the binary heads), continuous [C, Ac], scores [C] (the weighted
    score, float64).

    >>> r = RankResult(np.full((2, 1), 0.5), np.zeros((2, 0)), np.array([0.7, 0.2]))
    >>> int(r.scores.argmax())
    0
    """

    probs: np.ndarray
    continuous: np.ndarray
    scores: np.ndarray


def to_batch(
    queries: Sequence[RankQuery],
    model: PhoenixRanker | RankerEnsemble,
    history_len: int,
) -> RecsysBatch:
    """Hash raw queries into one ``RecsysBatch`` with the model's ``HashConfig``.

    History is left-padded to ``history_len`` (a longer history is an error, not truncated);
    candidates are right-padded to the batch's largest C. Raises ``ValueError`` naming the field
    on a query the model cannot take (action count, surface range, history length).
    """
    cfg = model.config
    A, B = cfg.num_actions, len(queries)
    if B == 0:
        raise ValueError("to_batch needs at least one query")
    S = history_len
    C = max(q.num_candidates for q in queries)
    user = np.zeros(B, np.int64)
    hp, ha, hs = (np.zeros((B, S), np.int64) for _ in range(3))
    acts = np.zeros((B, S, A), np.float32)
    cp, ca, cs = (np.zeros((B, C), np.int64) for _ in range(3))
    for i, q in enumerate(queries):
        n = q.history_len
        if n > S:
            raise ValueError(f"history has {n} events, at most {S} are allowed")
        if n and q.history_actions.shape[1] not in (0, A):  # 0 columns: no action set
            raise ValueError(
                f"history_actions has {q.history_actions.shape[1]} actions, the model has {A}"
            )
        user[i] = q.user_id
        if n:
            hp[i, S - n :], ha[i, S - n :] = q.history_post_ids, q.history_author_ids
            hs[i, S - n :] = q.history_surfaces
            if q.history_actions.shape[1]:
                acts[i, S - n :] = q.history_actions
        c = q.num_candidates
        cp[i, :c], ca[i, :c], cs[i, :c] = (
            q.candidate_post_ids,
            q.candidate_author_ids,
            q.candidate_surfaces,
        )
    h = cfg.hash
    for name, s in (("history_surfaces", hs), ("candidate_surfaces", cs)):
        if s.size and (int(s.min()) < 0 or int(s.max()) >= cfg.num_surfaces):
            bad = int(s.min()) if int(s.min()) < 0 else int(s.max())
            raise ValueError(f"{name} holds {bad}, expected 0..{cfg.num_surfaces - 1}")
    if ((acts != 0) & (acts != 1)).any():
        raise ValueError("history_actions must be multi-hot (0 or 1)")
    batch = RecsysBatch(
        user_hashes=torch.from_numpy(h.rows("user", user)),
        history_post_hashes=torch.from_numpy(h.rows("post", hp)),
        history_author_hashes=torch.from_numpy(h.rows("author", ha)),
        history_actions=torch.from_numpy(acts),
        history_product_surface=torch.from_numpy(hs),
        candidate_post_hashes=torch.from_numpy(h.rows("post", cp)),
        candidate_author_hashes=torch.from_numpy(h.rows("author", ca)),
        candidate_product_surface=torch.from_numpy(cs),
    )
    return batch.validate(h, num_actions=A, num_surfaces=cfg.num_surfaces)


def to_side_batch(
    queries: Sequence[RankQuery],
    model: PhoenixRanker | RankerEnsemble,
    history_len: int,
    store: SideStore,
) -> SideBatch:
    """The side features of raw queries, laid out as ``to_batch`` lays out the IDs (history
    left-padded to ``history_len``, candidates right-padded): ``side_batch`` on the store.

    Raises ``ValueError`` naming what a query lacks: a signal column the history events must
    carry (``SideStore.required_columns``), or the candidates' impression time when the ranker
    takes the post's age.
    """
    B, S = len(queries), history_len
    C = max(q.num_candidates for q in queries)
    users = np.array([q.user_id for q in queries], np.int64)
    cp, ct = np.zeros((B, C), np.int64), np.zeros((B, C), np.int64)
    ca = np.zeros((B, C), np.int64)  # authors: their rates, for a rate-feature ranker
    for i, q in enumerate(queries):
        n, c = q.history_len, q.num_candidates
        if n > S:
            raise ValueError(f"history has {n} events, at most {S} are allowed")
        unknown = sorted(set(q.history_signals) - set(store.request_columns))
        if unknown:
            raise ValueError(f"history_signals names {unknown}; this ranker's history events "
                             f"carry {list(store.request_columns)}")  # fmt: skip
        if n:  # a value the client sent as NaN is as missing as one it did not send
            missing = [k for k in store.required_columns if k not in q.history_signals
                       or np.isnan(q.history_signals[k]).any()]  # fmt: skip
            if missing:
                raise ValueError(f"history events need {missing[0]!r}: a history signal of "
                                 "this ranker (what the user did with the post)")  # fmt: skip
        if q.candidate_times_ms is None:
            if store.post_created is not None:
                raise ValueError("candidate_times_ms is missing: this ranker takes each "
                                 "candidate's age at its impression time")  # fmt: skip
        else:
            ct[i, :c] = q.candidate_times_ms
        cp[i, :c] = q.candidate_post_ids
        ca[i, :c] = q.candidate_author_ids
    hp, values = left_padded_history(
        store, [(q.history_post_ids, q.history_signals) for q in queries], S
    )
    return side_batch(store, model.config.hash, users, hp, values, cp, ct, ca)


class RequestRanker:
    """Scores raw ranking requests with a ``PhoenixRanker`` and a ``WeightedScorer``.

    The model is put in eval mode; scoring runs under ``torch.inference_mode``. Not thread-safe
    by itself: one thread (the server's model worker) calls ``rank`` at a time.

    >>> import torch
    >>> from hashrec import HashConfig, PhoenixRanker, RankerConfig, TransformerConfig
    >>> cfg = RankerConfig(hash=HashConfig.uniform(num_buckets=101),
    ...     transformer=TransformerConfig(dim=16, num_layers=1, num_q_heads=2, num_kv_heads=1),
    ...     actions=("click", "report"), continuous_actions=())
    >>> ranker = RequestRanker(PhoenixRanker(cfg), history_len=4,
    ...     scoring=ScoringConfig(weights={"click": 1.0, "report": -10.0}))
    >>> q = RankQuery(7, [11, 12, 13], [3, 3, 4], history_post_ids=[9],
    ...               history_author_ids=[2], history_actions=[[1, 0]])
    >>> [r.scores.shape for r in ranker.rank([q, q])]
    [(3,), (3,)]

    A ranker trained with side features needs ``side_store``: the ``SideStore`` of the log it
    was trained on, with its checkpoint's statistics and rates
    (``hashrec.serving.store.checkpoint_side_store(model, info, log)``).
    """

    def __init__(
        self,
        model: PhoenixRanker | RankerEnsemble,
        history_len: int = 32,
        scoring: ScoringConfig | None = None,
        side_store: SideStore | None = None,
    ) -> None:
        if not isinstance(model, PhoenixRanker | RankerEnsemble):
            raise ValueError(
                f"model must be a PhoenixRanker or a RankerEnsemble, got {type(model).__name__}"
            )
        if history_len < 0:
            raise ValueError(f"history_len must be >= 0, got {history_len}")
        self.side_store = check_side_store(model, side_store)
        if any(e.scheme == "identity" for e in model.config.hash.entities):
            raise ValueError(
                "the model hashes dense IDs (identity scheme, a full-table baseline): it cannot "
                "take raw IDs; serve a hashed model"
            )
        self.model = model.eval()
        self.history_len = history_len
        cfg = model.config
        if scoring is None:  # X's weights, mapped onto the model's actions (like the pipeline)
            scoring = scoring_config(tuple(cfg.actions) + tuple(cfg.continuous_actions))
        self.scorer = WeightedScorer(scoring, cfg.actions, cfg.continuous_actions)
        self.device = next(model.parameters()).device

    @property
    def actions(self) -> tuple[str, ...]:
        return self.model.config.actions

    @property
    def continuous_actions(self) -> tuple[str, ...]:
        return self.model.config.continuous_actions

    def rank(self, queries: Sequence[RankQuery]) -> list[RankResult]:
        """Score a batch of queries in one forward pass; one ``RankResult`` per query."""
        batch = to_batch(queries, self.model, self.history_len).to(self.device)
        side = None
        if self.side_store is not None:
            side = to_side_batch(queries, self.model, self.history_len, self.side_store)
        with torch.inference_mode():
            out = self.model(batch, side=side)
            probs = out.probs.float()
            scores = self.scorer.score(probs, out.continuous.float())  # [B, C]
        probs_np = probs.cpu().numpy()
        cont_np = out.continuous.float().cpu().numpy()
        scores_np = scores.cpu().numpy()
        results = []
        for i, q in enumerate(queries):
            c = q.num_candidates
            results.append(RankResult(probs_np[i, :c], cont_np[i, :c], scores_np[i, :c]))
        return results
