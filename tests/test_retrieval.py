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
