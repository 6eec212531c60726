"""The two-tower retriever on the evaluation days: Recall@K and NDCG@10 against popularity.

Queries, targets and metrics: ``hashrec.evaluation.retrieval``. Every method ranks the same
corpus (the posts shown before the evaluation days, cut to the recently active ones by
``CorpusConfig.active_days``) with the same exclusions (posts the user saw before), for the
same users. Popularity is reported twice, counted on every training day and on the prior's
window (``CorpusConfig.prior_days``) when one is set: the stronger is the honest baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hashrec.data import InteractionLog, RowHashes, batches
from hashrec.evaluation.retrieval import (
    NextEngagement,
    count_ranking,
    set_ndcg,
    set_recall,
)
from hashrec.models.two_tower import TwoTowerRetriever
from hashrec.retrieval.corpus import Corpus, CorpusConfig
from hashrec.retrieval.index import ExactIndex

__all__ = [
    "RetrievalReport",
    "corpus_index",
    "evaluate_retriever",
    "metrics_of",
    "two_tower_ranking",
    "user_vectors",
]


@torch.no_grad()
def user_vectors(
    model: TwoTowerRetriever,
    log: InteractionLog,
    hashes: RowHashes,
    queries: NextEngagement,
    batch_size: int = 1024,
) -> torch.Tensor:
    """The user tower on every query: [U, D] on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model.embed_users(lb.batch.to(device)).cpu()
        for lb in batches(log, hashes, queries.requests, batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, model.config.dim)


def corpus_index(
    model: TwoTowerRetriever, corpus: Corpus, chunk_size: int = 65_536, prior_weight: float = 0.0
) -> ExactIndex:
    """The corpus embedded once by the candidate tower, in an ``ExactIndex``; a non-zero
    ``prior_weight`` adds ``corpus.log_prior(prior_weight)`` as the index's bias."""
    h = model.config.hash
    device = next(model.parameters()).device
    emb = model.embed_corpus(
        torch.from_numpy(h.rows("post", corpus.post_ids)).to(device),
        torch.from_numpy(h.rows("author", corpus.author_ids)).to(device),
    )
    bias = torch.from_numpy(corpus.log_prior(prior_weight)) if prior_weight else None
    return ExactIndex(emb.cpu(), chunk_size=chunk_size, bias=bias)


def two_tower_ranking(
    model: TwoTowerRetriever,
    log: InteractionLog,
    hashes: RowHashes,
    queries: NextEngagement,
    corpus: Corpus,
    k: int,
    chunk_size: int = 65_536,
    query_batch: int = 1024,
    prior_weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k unseen post IDs [U, k] (-1: none left) and their scores [U, k]: the cosine, or
    with a ``prior_weight`` beta, cosine / temperature + beta * log(1 + corpus.popularity)."""
    index = corpus_index(model, corpus, chunk_size, prior_weight)
    u = user_vectors(model, log, hashes, queries)
    if prior_weight:
        u = u / model.temperature.detach().cpu()  # the trained logit scale
    ids = np.full((len(queries), k), -1, np.int64)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    for lo in range(0, len(queries), query_batch):
        hi = min(len(queries), lo + query_batch)
        excl = [corpus.positions(s) for s in queries.seen[lo:hi]]
        r = index.search(u[lo:hi], k, excl)
        pos = r.indices.numpy()
        ids[lo:hi] = np.where(pos >= 0, corpus.post_ids[np.maximum(pos, 0)], -1)
        scores[lo:hi] = r.scores.numpy()
    return ids, scores


@dataclass
class RetrievalReport:
    """metrics: method -> {"recall@10": v, ..., "ndcg@10": v}; users evaluated."""

    metrics: dict[str, dict[str, float]]
    users: int
    corpus_size: int

    def table(self) -> str:
        names = list(next(iter(self.metrics.values())))
        head = "| method | " + " | ".join(names) + " |"
        sep = "|---|" + "---:|" * len(names)
        rows = [
            f"| {m} | " + " | ".join(f"{v[n]:.4f}" for n in names) + " |"
            for m, v in self.metrics.items()
        ]
        return "\n".join([head, sep, *rows])


def metrics_of(
    ranked: np.ndarray, targets: list[np.ndarray], ks: Sequence[int], ndcg_k: int = 10
) -> dict[str, float]:
    out = {f"recall@{k}": set_recall(ranked, targets, k) for k in ks}
    out[f"ndcg@{ndcg_k}"] = set_ndcg(ranked, targets, ndcg_k)
    return out


def evaluate_retriever(
    model: TwoTowerRetriever,
    log: InteractionLog,
    hashes: RowHashes,
    queries: NextEngagement,
    train_mask: np.ndarray,
    positive_actions: tuple[str, ...],
    ks: Sequence[int] = (10, 50, 100),
    chunk_size: int = 65_536,
    config: CorpusConfig | None = None,
) -> RetrievalReport:
    """Two-tower top-K against popularity (most engaged training posts) on the same queries
    and the same corpus; with ``config.prior_weight`` also the two-tower with the prior."""
    config = config or CorpusConfig()
    before = queries.start or None
    corpus = config.corpus(log, positive_actions, before, train_mask)
    k = min(max(ks), len(corpus))
    ks = [x for x in ks if x <= k]
    every_day = Corpus.from_log(log, train_mask, positive_actions, before, config.active_days)
    methods = {
        "popularity": count_ranking(every_day.post_ids, every_day.popularity, queries.seen, k)
    }
    if config.prior_days is not None:
        methods[f"popularity (last {config.prior_days:g} days)"] = count_ranking(
            corpus.post_ids, corpus.popularity, queries.seen, k
        )
    methods["two-tower"] = two_tower_ranking(model, log, hashes, queries, corpus, k, chunk_size)[0]
    if config.prior_weight:
        methods[f"two-tower + prior (beta {config.prior_weight:g})"] = two_tower_ranking(
            model, log, hashes, queries, corpus, k, chunk_size, prior_weight=config.prior_weight
        )[0]
    return RetrievalReport(
        {m: metrics_of(r, queries.targets, ks) for m, r in methods.items()},
        users=len(queries),
        corpus_size=len(corpus),
    )
