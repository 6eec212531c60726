"""Retrieve -> rank -> score: the whole recommendation path over a corpus (DESIGN §5).

1. The two-tower retriever embeds the corpus once (``ExactIndex``); a request's user vector
   retrieves the ``retrieve_k`` best posts the user has not seen. With ``prior_weight`` beta
   the retrieval score is cosine / temperature + beta * log(1 + ``corpus.popularity``).
2. The Phoenix ranker predicts every action for those candidates.
3. The weighted scorer turns the probabilities into one score; author diversity and the final
   order come from ``WeightedScorer.rank``.

A user with no history and no known ID has no user vector: the cold-start path ranks the most
popular posts instead, and says so in ``RecommendResult.notice``.

A ranker trained with side features gets them from a ``SideStore`` (``hashrec.data.side_store``,
built by ``load_log`` from the log it was trained on): the user's and the candidates' features
by ID, the candidates' ages at the request's ``time_ms``, the history events' signals.

IDs here are the log's (``InteractionLog``) IDs; the CLI converts dataset IDs at its edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
import torch

from hashrec.data import InteractionLog
from hashrec.data.side_store import SideStore, left_padded_history, side_batch
from hashrec.models.ensemble import RankerEnsemble
from hashrec.models.ranker import PhoenixRanker
from hashrec.models.scoring import X_HOME_MIXER_WEIGHTS, ScoringConfig, WeightedScorer
from hashrec.models.two_tower import TwoTowerRetriever
from hashrec.nn.batch import RecsysBatch
from hashrec.retrieval.corpus import Corpus
from hashrec.retrieval.index import ExactIndex

__all__ = [
    "Corpus",
    "RecommendPipeline",
    "RecommendResult",
    "Recommendation",
    "UserRequest",
    "check_side_store",
    "default_weights",
    "scoring_config",
]

# Dataset actions -> the X action of the same meaning, whose published weight they take.
ACTION_EQUIVALENTS: dict[str, str] = {
    "like": "favorite",
    "comment": "reply",
    "forward": "share",
    "follow": "follow_author",
    "hate": "not_interested",
    "profile_enter": "profile_click",
    "long_view": "vqv",
}


def default_weights(actions: Sequence[str]) -> dict[str, float]:
    """X's home-mixer weight of each action, by name or by its X equivalent (KuaiRand's like ->
    favorite, hate -> not_interested, ...); actions with neither get no weight.

    >>> default_weights(("click", "like", "hate"))
    {'click': 0.4, 'like': 0.5, 'hate': -43.2}
    """
    out = {}
    for a in actions:
        x = a if a in X_HOME_MIXER_WEIGHTS else ACTION_EQUIVALENTS.get(a)
        if x is not None:
            out[a] = X_HOME_MIXER_WEIGHTS[x]
    return out


def scoring_config(
    actions: Sequence[str], overrides: dict[str, float] | None = None
) -> ScoringConfig:
    """``default_weights(actions)`` with ``overrides`` on top; names outside ``actions`` are a
    ValueError "names [...]" (a typo would otherwise weigh nothing, silently).

    >>> scoring_config(("click", "like"), {"click": 2.0}).weights
    {'click': 2.0, 'like': 0.5}
    """
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(actions))
    if unknown:
        raise ValueError(f"names {unknown}, the model predicts {tuple(actions)}")
    return ScoringConfig(weights={**default_weights(actions), **overrides})


SIDE_STORE_MISSING = (
    "this ranker was trained with side features: it needs the side store of the log it was "
    "trained on, standardising with the checkpoint's statistics (and its rates, for "
    "--rate-features): hashrec.serving.store.checkpoint_side_store(model, info, log)"
)


def check_side_store(
    ranker: PhoenixRanker | RankerEnsemble, store: SideStore | None
) -> SideStore | None:
    """The store a ranker's side features come from: None for a ranker without side features
    (a store given is not used); a ValueError for a ranker with side features and no store, or
    a store whose fields are not the ranker's (another log, or a ``--rate-features`` ranker
    served without its rates: ``hashrec.serving.store.checkpoint_side_store`` builds both)."""
    want = ranker.config.side
    if not want.any:
        return None
    if store is None:
        raise ValueError(SIDE_STORE_MISSING)
    got = store.side_config(ranker.config.hash)
    if got != want:
        raise ValueError(
            f"the side store gives {got}, the ranker takes {want}: give it the side tables of "
            "the log it was trained on"
        )
    return store


@dataclass
class UserRequest:
    """One user's request: history oldest -> newest (S events), posts to exclude.

    history_post_ids [S], history_author_ids [S], history_actions [S, A] 0/1 in ``actions``
    order, history_surface [S]; ``surface`` is where the feed is served (default: the latest
    history surface); ``known_user`` False sends the user token to padding.
    """

    user_id: int
    actions: tuple[str, ...]
    history_post_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    history_author_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    history_actions: np.ndarray | None = None
    history_surface: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seen_post_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    surface: int | None = None
    known_user: bool = True
    history_signals: dict[str, np.ndarray] = field(default_factory=dict)
    time_ms: int | None = None

    def __post_init__(self) -> None:
        S = len(self.history_post_ids)
        for name, v in self.history_signals.items():
            if len(v) != S:
                raise ValueError(f"history_signals[{name!r}] has {len(v)} events, "
                                 f"history_post_ids has {S}")  # fmt: skip
        if self.history_actions is None:
            self.history_actions = np.zeros((S, len(self.actions)), np.float32)
        for name in ("history_author_ids", "history_surface"):
            if len(getattr(self, name)) != S:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} events, history_post_ids has {S}"
                )
        if self.history_actions.shape != (S, len(self.actions)):
            raise ValueError(
                f"history_actions has shape {list(self.history_actions.shape)}, expected "
                f"{[S, len(self.actions)]}"
            )
        if self.surface is None:
            self.surface = int(self.history_surface[-1]) if S else 0

    @property
    def cold(self) -> bool:
        """Nothing to build a user vector from: an unknown user without history."""
        return not self.known_user and len(self.history_post_ids) == 0

    @classmethod
    def from_log(
        cls, log: InteractionLog, user_id: int, history_len: int, before_time: int | None = None
    ) -> UserRequest:
        """The user's ``history_len`` latest impressions (before ``before_time`` ms if given,
        which is then the request's ``time_ms``) with their signals; every post they saw then
        is excluded. A user absent from the log (before ``before_time``) is cold."""
        rows = np.flatnonzero(log.user == user_id)
        if before_time is not None:
            rows = rows[log.time[rows] < before_time]
        known = len(rows) > 0  # a user first seen after the request is cold at its time
        rows = rows[np.argsort(log.time[rows], kind="stable")]
        h = rows[len(rows) - history_len :] if history_len else rows[:0]
        return cls(
            user_id=int(user_id),
            actions=tuple(log.actions),
            history_post_ids=log.post[h],
            history_author_ids=log.author[h],
            history_actions=log.labels[h].astype(np.float32),
            history_surface=log.surface[h],
            seen_post_ids=np.unique(log.post[rows]),
            known_user=known,
            history_signals={c: v[h] for c, v in log.side.raw_signals.items()},
            time_ms=before_time,
        )


@dataclass
class Recommendation:
    """One recommended post: its score after author diversity, the ranker's probability of
    each action, and the retrieval (cosine) score that put it among the candidates."""

    post_id: int
    author_id: int
    score: float
    probs: dict[str, float]
    retrieval_score: float | None


@dataclass(eq=False)  # arrays have no single truth value: compare the columns yourself
class RecommendResult:
    """A user's list, best first, kept as columns (one row per post): ``post_ids``,
    ``author_ids``, ``scores`` [k], ``probs`` [k, len(actions)], ``retrieval_scores`` (NaN: not
    retrieved, the cold-start path). ``items`` builds one ``Recommendation`` per row on first
    access and keeps them (change the columns before that, as ``hashrec recommend`` does with
    its ID offset): a batch over many users that only needs the IDs never pays for the
    objects. ``notice`` says when the cold-start path was taken."""

    user_id: int
    actions: tuple[str, ...]
    post_ids: np.ndarray
    author_ids: np.ndarray
    scores: np.ndarray
    probs: np.ndarray
    retrieval_scores: np.ndarray
    cold_start: bool = False
    notice: str | None = None

    @cached_property
    def items(self) -> list[Recommendation]:
        return [
            Recommendation(post_id=pid, author_id=aid, score=sc,
                           probs=dict(zip(self.actions, pr, strict=True)),
                           retrieval_score=None if rs != rs else rs)  # NaN: none
            for pid, aid, sc, pr, rs in zip(
                self.post_ids.tolist(), self.author_ids.tolist(), self.scores.tolist(),
                self.probs.tolist(), self.retrieval_scores.tolist(), strict=True,
            )
        ]  # fmt: skip

    def as_dict(self) -> dict:
        """JSON-ready: the user, its items (each a dict) and the cold-start flag and notice."""
        return {
            "user_id": self.user_id,
            "items": [asdict(it) for it in self.items],
            "cold_start": self.cold_start,
            "notice": self.notice,
        }


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > n:
        raise ValueError(f"k is {k}, larger than the corpus ({n} posts)")


class RecommendPipeline:
    """Retrieve top-``retrieve_k`` from the corpus, rank with Phoenix, score, diversify.

    >>> import numpy as np
    >>> from hashrec import HashConfig, PhoenixRanker, RankerConfig, TransformerConfig
    >>> from hashrec.models.two_tower import TwoTowerConfig, TwoTowerRetriever
    >>> h, tf = HashConfig.uniform(101), TransformerConfig(dim=8, num_layers=1, num_q_heads=2,
    ...                                                    num_kv_heads=1)
    >>> acts = ("click", "like")
    >>> ranker = PhoenixRanker(RankerConfig(hash=h, transformer=tf, actions=acts,
    ...                                     continuous_actions=()))
    >>> retriever = TwoTowerRetriever(TwoTowerConfig(hash=h, transformer=tf, actions=acts))
    >>> corpus = Corpus(np.arange(1, 31), np.arange(1, 31) % 4 + 1, np.zeros(30))
    >>> pipe = RecommendPipeline(retriever, ranker, corpus, retrieve_k=10)
    >>> req = UserRequest(7, acts, np.array([3]), np.array([4]), np.ones((1, 2)), np.array([1]),
    ...                   seen_post_ids=np.array([3]))
    >>> out = pipe.recommend(req, k=5)
    >>> len(out.items), 3 in [r.post_id for r in out.items]
    (5, False)
    """

    def __init__(
        self,
        retriever: TwoTowerRetriever,
        ranker: PhoenixRanker | RankerEnsemble,
        corpus: Corpus,
        scorer: WeightedScorer | None = None,
        retrieve_k: int = 100,
        chunk_size: int = 65_536,
        history_len: int | None = None,
        side_store: SideStore | None = None,
        prior_weight: float = 0.0,
    ) -> None:
        if tuple(retriever.config.actions) != tuple(ranker.config.actions):
            raise ValueError(
                f"the retriever reads history actions {retriever.config.actions}, the ranker "
                f"{ranker.config.actions}: they must be trained on the same action list"
            )
        if retrieve_k < 1:
            raise ValueError(f"retrieve_k must be >= 1, got {retrieve_k}")
        self.side_store = check_side_store(ranker, side_store)
        if history_len is not None and history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")
        # Histories are left-padded to this fixed length (the trained one): with rotary positions
        # the padding length moves the history relative to the user and candidates, so padding
        # to the longest history in a batch would make a user's scores depend on the batch.
        self.history_len = history_len
        self.retriever, self.ranker, self.corpus = retriever.eval(), ranker.eval(), corpus
        self.actions = tuple(ranker.config.actions)
        if scorer is None:
            scorer = WeightedScorer(
                scoring_config(self.actions + tuple(ranker.config.continuous_actions)),
                self.actions, ranker.config.continuous_actions,
            )  # fmt: skip
        self.scorer = scorer
        self.retrieve_k = min(retrieve_k, len(corpus))
        self._device = next(ranker.parameters()).device
        rh, kh = retriever.config.hash, ranker.config.hash
        self._post_rows = {
            "retriever": torch.from_numpy(rh.rows("post", corpus.post_ids)),
            "ranker": torch.from_numpy(kh.rows("post", corpus.post_ids)),
        }
        self._author_rows = {
            "retriever": torch.from_numpy(rh.rows("author", corpus.author_ids)),
            "ranker": torch.from_numpy(kh.rows("author", corpus.author_ids)),
        }
        dev = next(retriever.parameters()).device
        emb = retriever.embed_corpus(
            self._post_rows["retriever"].to(dev), self._author_rows["retriever"].to(dev)
        )
        self.prior_weight = float(prior_weight)
        bias = torch.from_numpy(corpus.log_prior(prior_weight)) if prior_weight else None
        self.index = ExactIndex(emb.cpu(), chunk_size=chunk_size, bias=bias)
        self._popular = np.argsort(-corpus.popularity, kind="stable")

    # -- batches -------------------------------------------------------------------------------
    def _history_batch(
        self, model: str, requests: Sequence[UserRequest], candidates: np.ndarray | None
    ) -> RecsysBatch:
        """Left-padded histories (+ candidates [B, C] corpus positions) hashed for ``model``."""
        h = (self.retriever if model == "retriever" else self.ranker).config.hash
        B = len(requests)
        S = self.history_len or max(1, max(len(r.history_post_ids) for r in requests))
        post = np.zeros((B, S), np.int64)
        author = np.zeros((B, S), np.int64)
        surface = np.zeros((B, S), np.int64)
        acts = np.zeros((B, S, len(self.actions)), np.float32)
        users = np.zeros(B, np.int64)
        for i, r in enumerate(requests):
            n = min(len(r.history_post_ids), S)  # the latest S events
            if n:
                last = slice(len(r.history_post_ids) - n, None)
                post[i, S - n :] = r.history_post_ids[last]
                author[i, S - n :] = r.history_author_ids[last]
                surface[i, S - n :], acts[i, S - n :] = (
                    r.history_surface[last],
                    r.history_actions[last],
                )
            users[i] = r.user_id if r.known_user else 0
        cp = ca = cs = None  # the user tower's batch has no candidates
        if candidates is not None:
            idx = torch.from_numpy(candidates)
            valid = idx >= 0
            safe = idx.clamp(min=0)
            cp = self._post_rows[model][safe] * valid[..., None]
            ca = self._author_rows[model][safe] * valid[..., None]
            cs = torch.tensor([r.surface for r in requests])[:, None].expand(B, idx.shape[1])
            cs = (cs * valid).contiguous()
        return RecsysBatch(
            user_hashes=torch.from_numpy(h.rows("user", users)),  # ID 0 -> padding rows
            history_post_hashes=torch.from_numpy(h.rows("post", post)),
            history_author_hashes=torch.from_numpy(h.rows("author", author)),
            history_actions=torch.from_numpy(acts),
            history_product_surface=torch.from_numpy(surface),
            candidate_post_hashes=cp,
            candidate_author_hashes=ca,
            candidate_product_surface=cs,
        )  # fmt: skip

    def _side_batch(self, requests: Sequence[UserRequest], candidates: np.ndarray):
        """The ranker's side features, laid out as ``_history_batch`` lays out the IDs."""
        store = self.side_store
        assert store is not None
        B, C = candidates.shape
        S = self.history_len or max(1, max(len(r.history_post_ids) for r in requests))
        # the user's features by ID even when the ID is new to the log (its hash is padding):
        # the user table may know the user, as it would have in training
        users = np.array([r.user_id for r in requests], np.int64)
        post, values = left_padded_history(
            store, [(r.history_post_ids, r.history_signals) for r in requests], S
        )
        times = np.zeros((B, C), np.int64)
        for i, r in enumerate(requests):
            if store.post_created is not None:
                if r.time_ms is None:
                    raise ValueError("UserRequest.time_ms is missing: this ranker takes each "
                                     "candidate's age at the time the feed is served")  # fmt: skip
                times[i] = r.time_ms
        valid = candidates >= 0
        cp = np.where(valid, self.corpus.post_ids[np.maximum(candidates, 0)], 0)
        ca = np.where(valid, self.corpus.author_ids[np.maximum(candidates, 0)], 0)
        return side_batch(store, self.ranker.config.hash, users, post, values, cp, times, ca)

    # -- stages --------------------------------------------------------------------------------
    @torch.no_grad()
    def user_vectors(self, requests: Sequence[UserRequest]) -> torch.Tensor:
        """The user tower on each request: [B, D] (zeros for a cold request); divided by the
        retriever's temperature when a prior is added (its logit scale)."""
        dev = next(self.retriever.parameters()).device
        u = self.retriever.embed_users(
            self._history_batch("retriever", requests, None).to(dev)
        ).cpu()
        return u / self.retriever.temperature.cpu() if self.prior_weight else u

    def retrieve(
        self, requests: Sequence[UserRequest], k: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k unseen corpus positions and retrieval scores per request, [B, k] (-1: none
        left): the cosine, or with a prior cosine / temperature + the prior. Cold requests get
        the most popular unseen posts (scores nan)."""
        k = self.retrieve_k if k is None else k
        _check_k(k, len(self.corpus))
        exclude = [self.corpus.positions(r.seen_post_ids) for r in requests]
        pos = np.full((len(requests), k), -1, np.int64)
        score = np.full((len(requests), k), np.nan)
        warm = [i for i, r in enumerate(requests) if not r.cold]
        if warm:
            res = self.index.search(
                self.user_vectors([requests[i] for i in warm]), k, [exclude[i] for i in warm]
            )
            pos[warm], score[warm] = res.indices.numpy(), res.scores.numpy()
        for i, r in enumerate(requests):
            if r.cold:
                top = self._popular[~np.isin(self._popular, exclude[i])][:k]
                pos[i, : len(top)] = top
        return pos, score

    @torch.no_grad()
    def rank(
        self, requests: Sequence[UserRequest], candidates: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ranker on candidates [B, C] (corpus positions, -1 = none): probs [B, C, A] and
        weighted scores [B, C] (before author diversity)."""
        batch = self._history_batch("ranker", requests, candidates).to(self._device)
        side = None if self.side_store is None else self._side_batch(requests, candidates)
        out = self.ranker(batch, side=side)
        probs = out.probs.float().cpu()
        scores = self.scorer.score(probs, out.continuous.float().cpu())
        return probs.numpy(), scores.numpy()

    # -- the whole path ------------------------------------------------------------------------
    def recommend_batch(
        self, requests: Sequence[UserRequest], k: int, batch_size: int = 64
    ) -> list[RecommendResult]:
        """``recommend`` for many users, retrieving and ranking ``batch_size`` at a time."""
        _check_k(k, len(self.corpus))
        results = []
        for lo in range(0, len(requests), batch_size):
            part = requests[lo : lo + batch_size]
            pos, rscore = self.retrieve(part, max(k, self.retrieve_k))
            probs, scores = self.rank(part, pos)
            for i, r in enumerate(part):
                valid = pos[i] >= 0
                order, final = self.scorer.rank(
                    torch.from_numpy(scores[i]),
                    torch.from_numpy(self.corpus.author_ids[np.maximum(pos[i], 0)]),
                    mask=torch.from_numpy(valid),
                )
                top = order[:k].numpy()
                rows = pos[i, top]
                columns = (self.corpus.post_ids[rows], self.corpus.author_ids[rows],
                           final[:k].numpy(), probs[i, top], rscore[i, top])  # fmt: skip
                notice = None
                if r.cold:
                    notice = (
                        f"unknown user without history: cold start, ranking the "
                        f"{int(valid.sum())} most popular posts"
                    )
                results.append(RecommendResult(r.user_id, self.actions, *columns, r.cold, notice))
        return results

    def recommend(self, request: UserRequest, k: int = 20) -> RecommendResult:
        """The top-k posts for one user: retrieve, rank, score, diversify."""
        return self.recommend_batch([request], k)[0]
