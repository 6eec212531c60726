"""Two-tower retriever, its loss and the top-k index: normalisation, in-batch negatives, exact
chunked top-k against the full-sort reference (ties included), exclusions, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hashrec import HashConfig, RecsysBatch, TransformerConfig
from hashrec.models.losses import in_batch_logits, retrieval_loss
from hashrec.models.two_tower import TwoTowerConfig, TwoTowerRetriever, l2_normalise
from hashrec.retrieval import ExactIndex, reference_top_k

from conftest import make_batch


def tiny_retriever(seed: int = 0, dim: int = 16) -> TwoTowerRetriever:
    torch.manual_seed(seed)
    cfg = TwoTowerConfig(
        hash=HashConfig.uniform(num_buckets=97, num_hashes=2),
        transformer=TransformerConfig(dim=dim, num_layers=1, num_q_heads=2, num_kv_heads=1),
        actions=tuple(f"a{i}" for i in range(19)),
    )
    return TwoTowerRetriever(cfg)


# -- towers ------------------------------------------------------------------------------------
def test_both_towers_give_unit_vectors(small_config):
    model = tiny_retriever()
    batch = make_batch(small_config)
    u = model.embed_users(batch)
    v = model.embed_candidates(batch.candidate_post_hashes, batch.candidate_author_hashes)
    assert u.shape == (3, 16) and v.shape == (3, 4, 16)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3, 4))


def test_l2_normalise_keeps_zero_rows_zero():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(l2_normalise(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_user_tower_ignores_candidates_and_padding(small_config):
    model = tiny_retriever().eval()
    batch = make_batch(small_config, C=4)
    B, S, K = batch.history_post_hashes.shape
    no_candidates = RecsysBatch(
        batch.user_hashes,
        batch.history_post_hashes,
        batch.history_author_hashes,
        batch.history_actions,
        batch.history_product_surface,
        torch.zeros(B, 0, K, dtype=torch.long),
        torch.zeros(B, 0, K, dtype=torch.long),
        torch.zeros(B, 0, dtype=torch.long),
    )
    torch.testing.assert_close(model.embed_users(batch), model.embed_users(no_candidates))
    none = RecsysBatch(
        batch.user_hashes,
        batch.history_post_hashes,
        batch.history_author_hashes,
        batch.history_actions,
        batch.history_product_surface,
    )
    torch.testing.assert_close(model.embed_users(batch), model.embed_users(none))
    # request 0 has its last two history events padded: whatever their actions, same vector
    changed = make_batch(small_config, C=4)
    changed.history_actions[0, -2:] = 1.0
    torch.testing.assert_close(model.embed_users(batch)[0], model.embed_users(changed)[0])
    # a real history event does change the vector
    changed.history_actions[0, 0] = 1.0 - changed.history_actions[0, 0]
    assert not torch.allclose(model.embed_users(batch)[0], model.embed_users(changed)[0])


def test_missing_author_contributes_zeros(small_config):
    model = tiny_retriever()
    post = small_config.rows_torch("post", torch.tensor([11, 12]))
    author = small_config.rows_torch("author", torch.tensor([5, 0]))  # second: no author
    got = model.embed_candidates(post, author)
    p = model.table(post).reshape(2, -1)
    a = torch.cat([model.table(author[:1]).reshape(1, -1), torch.zeros(1, p.shape[1])])
    want = l2_normalise(model.candidate_mlp(torch.cat([p, a], dim=1)))
    torch.testing.assert_close(got, want)


def test_cold_request_has_zero_vector_not_nan(small_config):
    model = tiny_retriever()
    b = make_batch(small_config, B=2, S=3, C=2)
    b.user_hashes[0] = 0
    b.history_post_hashes[0] = 0
    b.history_author_hashes[0] = 0
    u = model.embed_users(b)
    assert torch.isfinite(u).all() and u[0].abs().sum() == 0 and u[1].abs().sum() > 0


def test_config_round_trips_and_rejects_bad_fields():
    cfg = tiny_retriever().config
    assert TwoTowerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown two-tower config fields"):
        TwoTowerConfig.from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="min_temperature"):
        TwoTowerConfig(init_temperature=0.001)


def test_temperature_is_learned_and_bounded():
    model = tiny_retriever()
    assert model.temperature.item() == pytest.approx(0.05)
    with torch.no_grad():
        model.log_inverse_temperature.fill_(20.0)
    assert model.temperature.item() == pytest.approx(model.config.min_temperature)


# -- loss --------------------------------------------------------------------------------------
def reference_loss(u, v, t, keys, log_q):
    """Per row: softmax over its positive and every column holding a different post."""
    total = 0.0
    for i in range(len(u)):
        cols = [i] + [j for j in range(len(u)) if keys[j] != keys[i]]
        logits = torch.stack([u[i] @ v[j] / t - log_q[j] for j in cols])
        total = total - torch.log_softmax(logits, 0)[0]
    return total / len(u)


def test_in_batch_negatives_never_include_the_positive():
    torch.manual_seed(0)
    B, D = 6, 8
    u = l2_normalise(torch.randn(B, D)).requires_grad_()
    v = l2_normalise(torch.randn(B, D)).requires_grad_()
    keys = torch.tensor([10, 11, 10, 12, 11, 10])  # post 10 three times, 11 twice
    log_q = torch.log(torch.tensor([0.3, 0.2, 0.3, 0.1, 0.2, 0.3]))
    logits = in_batch_logits(u, v, 0.1, keys, log_q)
    same = keys[:, None] == keys[None, :]
    off_diag = same & ~torch.eye(B, dtype=torch.bool)
    assert torch.isneginf(logits[off_diag]).all()  # a user's own post is no negative
    assert torch.isfinite(logits[~off_diag]).all()
    loss = retrieval_loss(u, v, 0.1, keys, log_q)
    ref = reference_loss(u, v, 0.1, keys, log_q)
    torch.testing.assert_close(loss, ref)
    g = torch.autograd.grad(loss, (u, v))
    g_ref = torch.autograd.grad(reference_loss(u, v, 0.1, keys, log_q), (u, v))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_log_q_correction_subtracts_per_column():
    u = torch.eye(3)
    keys = torch.arange(3)
    log_q = torch.tensor([-1.0, -2.0, -3.0])
    with_q = in_batch_logits(u, u, 1.0, keys, log_q)
    torch.testing.assert_close(with_q, in_batch_logits(u, u, 1.0, keys) - log_q[None, :])


def test_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="item_keys has shape"):
        retrieval_loss(torch.eye(2), torch.eye(2), 1.0, torch.arange(3))
    with pytest.raises(ValueError, match="items has shape"):
        retrieval_loss(torch.eye(2), torch.eye(3), 1.0, torch.arange(2))


# -- index -------------------------------------------------------------------------------------
def tied_corpus(n=23, d=4, seed=0):
    """Corpus with exact duplicates and a query set that ties on many scores."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-2, 3, (8, d), generator=g).float()
    corpus = base[torch.randint(0, 8, (n,), generator=g)]  # many identical rows: ties
    queries = torch.randint(-1, 2, (5, d), generator=g).float()
    return corpus, queries


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 23, 1000])
@pytest.mark.parametrize("k", [1, 4, 11, 23])
def test_chunked_equals_reference_with_ties(chunk, k):
    corpus, queries = tied_corpus()
    got = ExactIndex(corpus, chunk_size=chunk).search(queries, k)
    want = reference_top_k(corpus, queries, k)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.scores, want.scores)
    # ties go to the lower position: within equal scores positions ascend
    s, i = got.scores, got.indices
    same = s[:, 1:] == s[:, :-1]
    assert bool((i[:, 1:][same] > i[:, :-1][same]).all())


def test_chunked_equals_reference_on_random_data_with_exclusions():
    g = torch.Generator().manual_seed(1)
    corpus = l2_normalise(torch.randn(500, 16, generator=g))
    queries = l2_normalise(torch.randn(9, 16, generator=g))
    rng = np.random.default_rng(0)
    exclude = [rng.choice(500, size=rng.integers(0, 40), replace=False) for _ in range(9)]
    want = reference_top_k(corpus, queries, 50, exclude)
    for chunk in (7, 64, 499, 500):
        got = ExactIndex(corpus, chunk_size=chunk).search(queries, 50, exclude)
        assert torch.equal(got.indices, want.indices)
    for row, ex in zip(want.indices.tolist(), exclude, strict=True):
        assert not set(row) & set(ex.tolist())


def test_exclusions_leave_empty_slots_when_too_few_posts_remain():
    corpus = torch.eye(4)
    r = ExactIndex(corpus, chunk_size=3).search(torch.ones(1, 4), k=4, exclude=[[0, 2]])
    assert r.indices.tolist() == [[1, 3, -1, -1]]
    assert torch.isneginf(r.scores[0, 2:]).all()


def test_index_rejects_bad_input():
    index = ExactIndex(torch.eye(3))
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(torch.ones(1, 3), 0)
    with pytest.raises(ValueError, match="larger than the corpus"):
        index.search(torch.ones(1, 3), 4)
    with pytest.raises(ValueError, match=r"queries has shape \[1, 2\]"):
        index.search(torch.ones(1, 2), 1)
    with pytest.raises(ValueError, match="exclude holds position 3"):
        index.search(torch.ones(1, 3), 1, exclude=[[3]])
    with pytest.raises(ValueError, match="one per query"):
        index.search(torch.ones(2, 3), 1, exclude=[[0]])
    with pytest.raises(ValueError, match="NaN"):
        ExactIndex(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="chunk_size"):
        ExactIndex(torch.eye(3), chunk_size=0)


def test_faiss_flat_matches_exact_and_ann_recall():
    pytest.importorskip("faiss")
    from hashrec.retrieval import FaissIndex

    g = torch.Generator().manual_seed(2)
    corpus = l2_normalise(torch.randn(2000, 16, generator=g))
    queries = l2_normalise(torch.randn(20, 16, generator=g))
    exclude = [np.arange(i, i + 30) for i in range(20)]
    exact = ExactIndex(corpus, chunk_size=300).search(queries, 20, exclude)
    flat = FaissIndex(corpus, kind="flat").search(queries, 20, exclude)
    assert torch.equal(flat.indices, exact.indices)  # random floats: no ties
    torch.testing.assert_close(flat.scores, exact.scores)
    for kind in ("ivf", "hnsw"):
        ann = FaissIndex(corpus, kind=kind, nlist=32, nprobe=32, ef_search=200).search(
            queries, 20, exclude
        )
        hits = [
            len(set(a) & set(b))
            for a, b in zip(ann.indices.tolist(), exact.indices.tolist(), strict=True)
        ]
        assert sum(hits) / exact.indices.numel() > 0.9, kind
        for row, ex in zip(ann.indices.tolist(), exclude, strict=True):
            assert not set(row) & set(ex.tolist())


# -- popularity prior and the corpus window ----------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_biased_index_equals_reference_with_ties(chunk):
    corpus, queries = tied_corpus()
    bias = torch.tensor([0.0, 1.0, 0.0, 2.0] * 5 + [1.0, 0.0, 1.0])  # [23], more ties
    exclude = [[0, 5], [], [22], [1, 2, 3], []]
    want = reference_top_k(corpus, queries, 11, exclude, bias=bias)
    got = ExactIndex(corpus, chunk_size=chunk, bias=bias).search(queries, 11, exclude)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.scores, want.scores)
    # the reference is q . e + bias, scored and sorted by hand
    s = queries @ corpus.T + bias
    for r, ex in enumerate(exclude):
        s[r, ex] = float("-inf")
    assert torch.equal(want.scores, torch.sort(s, dim=1, descending=True).values[:, :11])


def test_a_large_bias_orders_by_bias_and_a_zero_bias_changes_nothing():
    g = torch.Generator().manual_seed(3)
    corpus = l2_normalise(torch.randn(50, 8, generator=g))
    queries = l2_normalise(torch.randn(4, 8, generator=g))
    bias = torch.randperm(50, generator=g).float()
    big = ExactIndex(corpus, chunk_size=16, bias=1e3 * bias).search(queries, 10)
    assert big.indices.tolist() == [torch.argsort(-bias)[:10].tolist()] * 4
    zero = ExactIndex(corpus, chunk_size=16, bias=torch.zeros(50)).search(queries, 10)
    plain = ExactIndex(corpus, chunk_size=16).search(queries, 10)
    assert torch.equal(zero.indices, plain.indices)


def test_bias_is_validated():
    with pytest.raises(ValueError, match=r"bias has shape \[2\], expected \[3\]"):
        ExactIndex(torch.eye(3), bias=torch.zeros(2))
    with pytest.raises(ValueError, match="bias holds NaN"):
        ExactIndex(torch.eye(3), bias=torch.tensor([0.0, float("inf"), 0.0]))
    with pytest.raises(ValueError, match="bias has shape"):
        reference_top_k(torch.eye(3), torch.ones(1, 3), 1, bias=torch.zeros(3, 1))


def test_faiss_flat_with_bias_matches_exact():
    pytest.importorskip("faiss")
    from hashrec.retrieval import FaissIndex

    g = torch.Generator().manual_seed(4)
    corpus = l2_normalise(torch.randn(300, 8, generator=g))
    queries = l2_normalise(torch.randn(6, 8, generator=g)) / 0.05  # a logit scale
    bias = torch.rand(300, generator=g) * 5
    exclude = [np.arange(i, i + 10) for i in range(6)]
    exact = ExactIndex(corpus, chunk_size=64, bias=bias).search(queries, 15, exclude)
    flat = FaissIndex(corpus, kind="flat", bias=bias).search(queries, 15, exclude)
    assert torch.equal(flat.indices, exact.indices)
    torch.testing.assert_close(flat.scores, exact.scores, rtol=1e-5, atol=1e-4)


def toy_log():
    """Three days: post 1 shown on day 0 only, 2 every day, 3 on day 2 only (after the cut)."""
    from hashrec.data import InteractionLog
    from hashrec.retrieval.corpus import DAY_MS

    post = np.array([1, 1, 2, 2, 2, 2, 3, 4])
    time = np.array([0, 1, 2, DAY_MS, DAY_MS + 5, 2 * DAY_MS, 2 * DAY_MS + 1, DAY_MS + 9])
    n = len(post)
    return InteractionLog(
        user=np.arange(1, n + 1), post=post, author=post + 10, surface=np.zeros(n, np.int64),
        time=time, day=np.full(n, 20220425), labels=np.array([[1, 0], [1, 1], [1, 0], [0, 1],
        [1, 0], [1, 0], [1, 0], [0, 0]], np.uint8), continuous=np.zeros((n, 0), np.float32),
        actions=("click", "like"),
    )  # fmt: skip


def test_corpus_as_it_stood_at_the_request_time():
    from hashrec.retrieval.corpus import DAY_MS, Corpus

    log = toy_log()
    cut = 2 * DAY_MS  # the request: the start of day 2
    c = Corpus.from_log(log, positive_actions=("click",), before_time=cut)
    assert c.post_ids.tolist() == [1, 2, 4]  # post 3 is first shown after the cut
    assert c.popularity.tolist() == [2.0, 2.0, 0.0]  # the day-2 click on 2 is not counted
    recent = Corpus.from_log(log, positive_actions=("click",), before_time=cut, active_days=1)
    assert recent.post_ids.tolist() == [2, 4]  # post 1 was last shown two days before
    windowed = Corpus.from_log(log, positive_actions=("click",), before_time=cut,
                               popularity_days=1)  # fmt: skip
    assert windowed.popularity.tolist() == [0.0, 1.0, 0.0]
    likes = Corpus.from_log(log, np.arange(len(log)) != 3, ("like",), before_time=cut)
    assert likes.popularity.tolist() == [1.0, 0.0, 0.0]  # the mask drops row 3
    whole = Corpus.from_log(log)
    assert whole.post_ids.tolist() == [1, 2, 3, 4] and whole.author_ids.tolist() == [11, 12, 13, 14]
    with pytest.raises(ValueError, match="active_days must be > 0"):
        Corpus.from_log(log, active_days=0)
    with pytest.raises(ValueError, match="the corpus is empty"):
        Corpus.from_log(log, before_time=0)


def test_corpus_config_validates_and_builds_the_corpus():
    from hashrec.retrieval import CorpusConfig
    from hashrec.retrieval.corpus import DAY_MS

    cfg = CorpusConfig(active_days=1, prior_weight=0.5, prior_days=1)
    c = cfg.corpus(toy_log(), ("click",), before_time=2 * DAY_MS)
    assert c.post_ids.tolist() == [2, 4] and c.popularity.tolist() == [1.0, 0.0]
    np.testing.assert_allclose(c.log_prior(0.5), [0.5 * np.log(2), 0.0], rtol=1e-6)
    assert CorpusConfig(**cfg.to_dict()) == cfg
    for bad, match in (({"active_days": 0}, "active_days"), ({"prior_days": -1}, "prior_days"),
                       ({"prior_weight": float("nan")}, "prior_weight")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            CorpusConfig(**bad)


def test_two_tower_ranking_with_the_prior_is_cosine_over_temperature_plus_prior():
    from hashrec.data import Requests, RowHashes
    from hashrec.evaluation.retrieval import NextEngagement, count_ranking
    from hashrec.retrieval import Corpus
    from hashrec.retrieval.evaluate import two_tower_ranking, user_vectors

    torch.manual_seed(0)
    tf = TransformerConfig(dim=8, num_layers=1, num_q_heads=2, num_kv_heads=1)
    h = HashConfig.uniform(num_buckets=97, num_hashes=2)
    model = TwoTowerRetriever(TwoTowerConfig(hash=h, transformer=tf, actions=("click", "like")))
    log = toy_log()
    U = 3
    history = np.array([[0, 1], [-1, 2], [3, 4]])  # log rows, -1 padding
    requests = Requests(np.array([0, 1, 2]), history, np.full((U, 1), -1), np.zeros((U, 0), int))
    seen = [np.array([1]), np.array([], np.int64), np.array([2])]
    targets = [np.array([2]), np.array([1]), np.array([3])]
    queries = NextEngagement(np.array([1, 2, 3]), requests, seen, targets, np.ones(U, bool))
    corpus = Corpus(np.array([1, 2, 3]), np.array([11, 12, 13]), np.array([5.0, 1.0, 0.0]))
    hashes = RowHashes(log, h)
    beta = 0.7
    ids, scores = two_tower_ranking(model, log, hashes, queries, corpus, 2, prior_weight=beta)
    u = user_vectors(model, log, hashes, queries)
    v = model.embed_corpus(torch.from_numpy(h.rows("post", corpus.post_ids)),
                           torch.from_numpy(h.rows("author", corpus.author_ids)))  # fmt: skip
    prior = beta * torch.log1p(torch.tensor([5.0, 1.0, 0.0]))
    want = (u @ v.T) / model.temperature.detach() + prior  # [U, N]
    for i, seen in enumerate(queries.seen):
        s = want[i].clone()
        s[np.searchsorted(corpus.post_ids, seen)] = float("-inf")
        top = torch.argsort(s, descending=True)[:2]
        assert ids[i].tolist() == corpus.post_ids[top.numpy()].tolist()
        np.testing.assert_allclose(scores[i], s[top].numpy(), rtol=1e-5)
    # without the prior: plain cosine scores; with an overwhelming one: popularity
    _, cos = two_tower_ranking(model, log, hashes, queries, corpus, 2)
    assert np.abs(cos).max() <= 1.0 + 1e-6
    huge, _ = two_tower_ranking(model, log, hashes, queries, corpus, 2, prior_weight=1e4)
    pop = count_ranking(corpus.post_ids, corpus.popularity, queries.seen, 2)
    assert (huge[pop >= 0] == pop[pop >= 0]).all()
