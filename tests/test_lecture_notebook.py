"""The lecture notebook's cells, with hashrec's classes in place of the cells' own definitions.

Each test is one cell of "Lecture 2: Hash Embeddings" (its constants, constructors, call order,
shapes and padding rules), written here in full so the suite needs nothing outside the repository.
The last test carries the notebook's tokens on into hashrec's transformer, which the notebook only
promises ("these would be concatenated and fed into the transformer").
"""

from __future__ import annotations

import pytest
import torch

from hashrec import (
    BlockCandidateReduce,
    BlockHistoryReduce,
    BlockUserReduce,
    MultiHashEmbedding,
    RecsysBatch,
    RecsysEmbeddings,
    Transformer,
    TransformerConfig,
)
from hashrec.analysis.collisions import lecture_pair_probability

# The notebook's configuration cell ("matches X's HashConfig").
EMB_SIZE = 64
NUM_USER_HASHES = 2
NUM_ITEM_HASHES = 2
NUM_AUTHOR_HASHES = 2
VOCAB_SIZE = 100_000
NUM_ACTIONS = 19


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)  # the notebook's seed


def test_cell_multi_hash_embedding():
    hash_emb = MultiHashEmbedding(VOCAB_SIZE, EMB_SIZE, NUM_USER_HASHES)
    user_hashes = torch.randint(1, VOCAB_SIZE, (4, NUM_USER_HASHES))
    user_embeddings = hash_emb(user_hashes)
    assert user_hashes.shape == (4, 2)
    assert user_embeddings.shape == (4, 2, 64)
    # one table per hash (the notebook's semantics): the same index in slot 0 and slot 1 reads
    # two different rows; the same index in the same slot always reads the same row
    same = torch.tensor([[7, 7], [7, 7]])
    e = hash_emb(same)
    assert not torch.equal(e[0, 0], e[0, 1])
    assert torch.equal(e[0], e[1])


def test_cell_block_user_reduce():
    hash_emb = MultiHashEmbedding(VOCAB_SIZE, EMB_SIZE, NUM_USER_HASHES)
    block_user_reduce = BlockUserReduce(NUM_USER_HASHES, EMB_SIZE)
    user_hashes = torch.randint(1, VOCAB_SIZE, (4, NUM_USER_HASHES))
    user_embeddings = hash_emb(user_hashes)
    user_emb, user_mask = block_user_reduce(user_hashes, user_embeddings)
    assert user_emb.shape == (4, 1, 64)
    assert user_mask.shape == (4, 1)
    assert user_mask.flatten().tolist() == [True] * 4
    # padding rule: a user whose first hash is 0 is masked out
    user_hashes[2] = 0
    _, mask = block_user_reduce(user_hashes, hash_emb(user_hashes))
    assert mask.flatten().tolist() == [True, True, False, True]


def test_cell_block_history_reduce():
    block_history_reduce = BlockHistoryReduce(
        NUM_ITEM_HASHES, NUM_AUTHOR_HASHES, EMB_SIZE, num_actions=19
    )
    B, S = 4, 10
    history_post_hashes = torch.randint(1, VOCAB_SIZE, (B, S, NUM_ITEM_HASHES))
    history_post_hashes[:, S // 2 :, :] = 0  # second half is padding
    history_post_embeddings = torch.randn(B, S, NUM_ITEM_HASHES, EMB_SIZE)
    history_author_embeddings = torch.randn(B, S, NUM_AUTHOR_HASHES, EMB_SIZE)
    history_product_surface = torch.randint(0, 16, (B, S))
    history_actions = torch.zeros(B, S, 19)
    history_actions[:, : S // 2, :] = torch.randint(0, 2, (B, S // 2, 19))  # first half valid

    history_emb, history_mask = block_history_reduce(
        history_post_hashes,
        history_post_embeddings,
        history_author_embeddings,
        history_product_surface,
        history_actions,
    )
    assert history_emb.shape == (4, 10, 64)
    assert history_mask.shape == (4, 10)
    assert history_mask.sum(dim=1).tolist() == [5, 5, 5, 5]
    # padding rule: the mask comes from the first post hash only
    assert torch.equal(history_mask, history_post_hashes[:, :, 0] != 0)
    # an event with no action gets a zero action vector (the notebook's valid_mask)
    act = block_history_reduce.actions(history_actions)
    assert act[:, S // 2 :].abs().sum() == 0 and act[:, : S // 2].abs().sum() > 0


def test_cell_containers_take_the_notebook_fields():
    B, S, C, D = 2, 5, 3, 8
    batch = RecsysBatch(
        user_hashes=torch.randint(1, 100, (B, NUM_USER_HASHES)),
        history_post_hashes=torch.randint(1, 100, (B, S, NUM_ITEM_HASHES)),
        history_author_hashes=torch.randint(1, 100, (B, S, NUM_AUTHOR_HASHES)),
        history_actions=torch.randint(0, 2, (B, S, NUM_ACTIONS)).float(),
        history_product_surface=torch.randint(0, 16, (B, S)),
        candidate_post_hashes=torch.randint(1, 100, (B, C, NUM_ITEM_HASHES)),
        candidate_author_hashes=torch.randint(1, 100, (B, C, NUM_AUTHOR_HASHES)),
        candidate_product_surface=torch.randint(0, 16, (B, C)),
    )
    emb = RecsysEmbeddings(
        user_embeddings=torch.randn(B, NUM_USER_HASHES, D),
        history_post_embeddings=torch.randn(B, S, NUM_ITEM_HASHES, D),
        history_author_embeddings=torch.randn(B, S, NUM_AUTHOR_HASHES, D),
        candidate_post_embeddings=torch.randn(B, C, NUM_ITEM_HASHES, D),
        candidate_author_embeddings=torch.randn(B, C, NUM_AUTHOR_HASHES, D),
    )
    assert (batch.batch_size, batch.history_len, batch.num_candidates) == (B, S, C)
    assert emb.history_author_embeddings.shape == (B, S, 2, D)


def test_cell_end_to_end_pipeline_and_on_into_the_transformer():
    """Cell 6 (the demo) with the notebook's sizes, then the tokens through hashrec's transformer."""
    batch_size, history_len, num_candidates = 2, 5, 3

    user_hash_table = MultiHashEmbedding(VOCAB_SIZE, EMB_SIZE, NUM_USER_HASHES)
    post_hash_table = MultiHashEmbedding(VOCAB_SIZE, EMB_SIZE, NUM_ITEM_HASHES)
    author_hash_table = MultiHashEmbedding(VOCAB_SIZE, EMB_SIZE, NUM_AUTHOR_HASHES)
    block_user = BlockUserReduce(NUM_USER_HASHES, EMB_SIZE)
    block_history = BlockHistoryReduce(NUM_ITEM_HASHES, NUM_AUTHOR_HASHES, EMB_SIZE)

    user_hashes = torch.randint(1, VOCAB_SIZE, (batch_size, NUM_USER_HASHES))
    history_post_hashes = torch.randint(1, VOCAB_SIZE, (batch_size, history_len, NUM_ITEM_HASHES))
    history_author_hashes = torch.randint(
        1, VOCAB_SIZE, (batch_size, history_len, NUM_AUTHOR_HASHES)
    )
    candidate_post_hashes = torch.randint(
        1, VOCAB_SIZE, (batch_size, num_candidates, NUM_ITEM_HASHES)
    )
    candidate_author_hashes = torch.randint(
        1, VOCAB_SIZE, (batch_size, num_candidates, NUM_AUTHOR_HASHES)
    )
    history_product_surface = torch.randint(0, 16, (batch_size, history_len))
    history_actions = torch.randint(0, 2, (batch_size, history_len, 19)).float()
    candidate_product_surface = torch.randint(0, 16, (batch_size, num_candidates))

    # Step 1: the notebook's lookups (flatten to [N, K], look up, reshape back)
    user_embeddings = user_hash_table(user_hashes)
    history_post_embeddings = post_hash_table(
        history_post_hashes.reshape(-1, NUM_ITEM_HASHES)
    ).reshape(batch_size, history_len, NUM_ITEM_HASHES, EMB_SIZE)
    history_author_embeddings = author_hash_table(
        history_author_hashes.reshape(-1, NUM_AUTHOR_HASHES)
    ).reshape(batch_size, history_len, NUM_AUTHOR_HASHES, EMB_SIZE)
    candidate_post_embeddings = post_hash_table(
        candidate_post_hashes.reshape(-1, NUM_ITEM_HASHES)
    ).reshape(batch_size, num_candidates, NUM_ITEM_HASHES, EMB_SIZE)
    candidate_author_embeddings = author_hash_table(
        candidate_author_hashes.reshape(-1, NUM_AUTHOR_HASHES)
    ).reshape(batch_size, num_candidates, NUM_AUTHOR_HASHES, EMB_SIZE)
    # hashrec's tables also take [..., K] directly: same vectors without the reshapes
    torch.testing.assert_close(history_post_embeddings, post_hash_table(history_post_hashes))

    # the containers carry the same tensors (the notebook defines them for this hand-off)
    batch = RecsysBatch(
        user_hashes=user_hashes,
        history_post_hashes=history_post_hashes,
        history_author_hashes=history_author_hashes,
        history_actions=history_actions,
        history_product_surface=history_product_surface,
        candidate_post_hashes=candidate_post_hashes,
        candidate_author_hashes=candidate_author_hashes,
        candidate_product_surface=candidate_product_surface,
    )
    emb = RecsysEmbeddings(
        user_embeddings=user_embeddings,
        history_post_embeddings=history_post_embeddings,
        history_author_embeddings=history_author_embeddings,
        candidate_post_embeddings=candidate_post_embeddings,
        candidate_author_embeddings=candidate_author_embeddings,
    )

    # Step 2: reduce, in the notebook's positional order
    user_emb, user_mask = block_user(batch.user_hashes, emb.user_embeddings)
    history_emb, history_mask = block_history(
        batch.history_post_hashes,
        emb.history_post_embeddings,
        emb.history_author_embeddings,
        batch.history_product_surface,
        batch.history_actions,
    )
    # Step 3: the notebook's assertions
    assert user_emb.shape == (batch_size, 1, EMB_SIZE)
    assert user_mask.shape == (batch_size, 1)
    assert history_emb.shape == (batch_size, history_len, EMB_SIZE)
    assert history_mask.shape == (batch_size, history_len)

    # On into the transformer: candidates (Phoenix's third reducer) and candidate isolation
    block_cand = BlockCandidateReduce(
        NUM_ITEM_HASHES, NUM_AUTHOR_HASHES, EMB_SIZE, block_history.product_surface_embedding_table
    )
    cand_emb, cand_mask = block_cand(
        batch.candidate_post_hashes,
        emb.candidate_post_embeddings,
        emb.candidate_author_embeddings,
        batch.candidate_product_surface,
    )
    tf = Transformer(TransformerConfig(dim=EMB_SIZE, num_layers=1, num_q_heads=2, num_kv_heads=1))
    x = torch.cat([user_emb, history_emb, cand_emb], dim=1)  # [B, 1+S+C, D]
    valid = torch.cat([user_mask, history_mask, cand_mask], dim=1)
    out = tf(x, valid, num_candidates=num_candidates)
    assert out.shape == (batch_size, 1 + history_len + num_candidates, EMB_SIZE)
    # candidates never see each other: changing candidate 0 leaves candidate 2's output alone
    x2 = x.clone()
    x2[:, -num_candidates] += 1.0
    out2 = tf(x2, valid, num_candidates=num_candidates)
    torch.testing.assert_close(out2[:, -1], out[:, -1])
    assert not torch.allclose(out2[:, -num_candidates], out[:, -num_candidates])

    # gradients reach every table through the whole path
    (out[:, -num_candidates:].sum()).backward()
    for table in (user_hash_table, post_hash_table, author_hash_table):
        grads = [p.grad for p in table.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)


def test_cell_collision_probability_is_the_lecture_formula():
    """Cell 7 plots (1/V)^k; hashrec names that quantity (and explains why it is not the one a
    table needs: ``hashrec.analysis.collisions``)."""
    for vocab_size in (1000, 10000, 100000, 1000000):
        for n in range(1, 6):
            # V usable rows = N - 1 buckets (row 0 is padding)
            assert lecture_pair_probability(n, vocab_size + 1) == pytest.approx(
                (1.0 / vocab_size) ** n
            )
