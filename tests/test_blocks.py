import pytest
import torch

from hashrec import (
    BlockCandidateReduce,
    BlockHistoryReduce,
    BlockUserReduce,
    FusedEmbeddingTable,
    MultiHashEmbedding,
    RecsysBatch,
    RecsysEmbeddings,
)
from hashrec.nn.blocks import ActionEmbedding

from conftest import make_batch


def test_user_reduce_is_flatten_then_proj_mat_1():
    torch.manual_seed(0)
    red = BlockUserReduce(num_hashes=2, emb_size=4)
    emb = torch.randn(3, 2, 4)
    hashes = torch.tensor([[5, 6], [0, 0], [9, 1]])
    tok, mask = red(hashes, emb)
    torch.testing.assert_close(tok[:, 0], emb.reshape(3, 8) @ red.proj_mat_1)
    assert mask.tolist() == [[True], [False], [True]]


def test_action_embedding_signed_multi_hot_and_zero_without_action():
    torch.manual_seed(1)
    act = ActionEmbedding(num_actions=3, dim=5)
    a = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    out = act(a)
    P = act.action_projection
    torch.testing.assert_close(out[0], P[0] - P[1] + P[2])
    assert out[1].abs().sum() == 0
    torch.testing.assert_close(act(a.long()), out)  # integer multi-hot gives the same
    torch.testing.assert_close(act(a.bool()), out)


def test_history_and_candidate_reduce_match_concat_formula(small_config):
    torch.manual_seed(2)
    D = 4
    batch = make_batch(small_config, A=19)
    table = FusedEmbeddingTable.from_config(small_config, D)
    e = table.lookup(batch)
    hist = BlockHistoryReduce(2, 2, D, num_actions=19)
    cand = BlockCandidateReduce(2, 2, D, hist.product_surface_embedding_table)
    assert cand.product_surface_embedding_table is hist.product_surface_embedding_table  # shared
    h, hm = hist(
        batch.history_post_hashes,
        e.history_post_embeddings,
        e.history_author_embeddings,
        batch.history_product_surface,
        batch.history_actions,
    )
    B, S = batch.history_product_surface.shape
    a = batch.history_actions
    act = ((2 * a - 1) @ hist.action_projection) * a.any(-1, keepdim=True)
    surf = hist.product_surface_embedding_table.weight[batch.history_product_surface]
    x = torch.cat(
        [
            e.history_post_embeddings.reshape(B, S, -1),
            e.history_author_embeddings.reshape(B, S, -1),
            act,
            surf,
        ],
        -1,
    )
    torch.testing.assert_close(h, x @ hist.proj_mat_3)
    assert torch.equal(hm, batch.history_post_hashes[..., 0] != 0)
    assert not hm[0, -1] and hm[0, 0]
    c, cm = cand(
        batch.candidate_post_hashes,
        e.candidate_post_embeddings,
        e.candidate_author_embeddings,
        batch.candidate_product_surface,
    )
    C = batch.num_candidates
    xc = torch.cat(
        [
            e.candidate_post_embeddings.reshape(B, C, -1),
            e.candidate_author_embeddings.reshape(B, C, -1),
            hist.product_surface_embedding_table.weight[batch.candidate_product_surface],
        ],
        -1,
    )
    torch.testing.assert_close(c, xc @ cand.proj_mat_2)
    assert cm.tolist()[1][-1] is False and cm.shape == (B, C)


def test_phoenix_parameter_names():
    names = {n for n, _ in BlockHistoryReduce(2, 2, 4).named_parameters()}
    assert names == {
        "actions.action_projection",
        "product_surface_embedding_table.weight",
        "proj_mat_3",
    }
    assert {n for n, _ in BlockUserReduce(2, 4).named_parameters()} == {"proj_mat_1"}
    assert "proj_mat_2" in dict(BlockCandidateReduce(2, 2, 4).named_parameters())


def test_notebook_code_runs_on_hashrec():
    """The lecture's flow: per-entity MultiHashEmbedding, containers, user + history reducers."""
    torch.manual_seed(3)
    B, S, C, D, V = 2, 4, 3, 8, 100
    post_emb = MultiHashEmbedding(vocab_size=V, emb_size=D, num_hashes=2)
    author_emb = MultiHashEmbedding(vocab_size=V, emb_size=D, num_hashes=2)
    user_emb = MultiHashEmbedding(vocab_size=V, emb_size=D, num_hashes=2)
    batch = RecsysBatch(
        user_hashes=torch.randint(1, V, (B, 2)),
        history_post_hashes=torch.randint(1, V, (B, S, 2)),
        history_author_hashes=torch.randint(1, V, (B, S, 2)),
        history_actions=torch.randint(0, 2, (B, S, 19)),  # integer multi-hot, as some cells use
        history_product_surface=torch.randint(0, 16, (B, S)),
        candidate_post_hashes=torch.randint(1, V, (B, C, 2)),
        candidate_author_hashes=torch.randint(1, V, (B, C, 2)),
        candidate_product_surface=torch.randint(0, 16, (B, C)),
    )
    emb = RecsysEmbeddings(
        user_embeddings=user_emb(batch.user_hashes),
        history_post_embeddings=post_emb(batch.history_post_hashes),
        candidate_post_embeddings=post_emb(batch.candidate_post_hashes),
        history_author_embeddings=author_emb(batch.history_author_hashes),
        candidate_author_embeddings=author_emb(batch.candidate_author_hashes),
    )
    user_tok, _ = BlockUserReduce(num_hashes=2, emb_size=D)(batch.user_hashes, emb.user_embeddings)
    hist = BlockHistoryReduce(num_item_hashes=2, num_author_hashes=2, emb_size=D, num_actions=19)
    h_int, m = hist(
        batch.history_post_hashes,
        emb.history_post_embeddings,
        emb.history_author_embeddings,
        batch.history_product_surface,
        batch.history_actions,
    )
    h_float, _ = hist(
        batch.history_post_hashes,
        emb.history_post_embeddings,
        emb.history_author_embeddings,
        batch.history_product_surface,
        batch.history_actions.float(),
    )
    torch.testing.assert_close(h_int, h_float)
    assert user_tok.shape == (B, 1, D) and h_int.shape == (B, S, D) and m.all()
    # the notebook's semantics: hash j of the post indexes its own table j
    ref = post_emb.weight[batch.history_post_hashes[..., 1] + V]
    torch.testing.assert_close(emb.history_post_embeddings[..., 1, :], ref)
    (h_int.sum() + user_tok.sum()).backward()
    assert post_emb.weight.grad is not None and post_emb.weight.grad[0].abs().sum() == 0


def _history_inputs(B=2, S=4, D=8, A=19, seed=4):
    g = torch.Generator().manual_seed(seed)
    hashes = torch.randint(1, 50, (B, S, 2), generator=g)
    hashes[:, -1] = 0
    post = torch.randn(B, S, 2, D, generator=g)
    author = torch.randn(B, S, 2, D, generator=g)
    surface = torch.randint(0, 16, (B, S), generator=g)
    actions = (torch.rand(B, S, A, generator=g) < 0.3).float()
    return hashes, post, author, surface, actions


def test_history_reduce_takes_phoenix_order_positionally_and_by_keyword():
    """(hashes, post, author, surface, actions), as Phoenix's block_history_reduce and the lecture."""
    torch.manual_seed(5)
    red = BlockHistoryReduce(2, 2, 8, num_actions=19)
    hashes, post, author, surface, actions = _history_inputs()
    pos, pos_mask = red(hashes, post, author, surface, actions)
    kw, kw_mask = red(
        history_actions=actions,
        history_product_surface=surface,
        history_author_embeddings=author,
        history_post_embeddings=post,
        history_post_hashes=hashes,
    )
    torch.testing.assert_close(pos, kw)
    assert torch.equal(pos_mask, kw_mask)
    # the surface argument really is the surface: changing it changes exactly that term
    other = (surface + 1) % 16
    moved, _ = red(hashes, post, author, other, actions)
    table = red.product_surface_embedding_table.weight
    D = 8
    delta = (table[other] - table[surface]) @ red.proj_mat_3[-D:]  # surface is the last block
    torch.testing.assert_close(moved - pos, delta)


def test_history_reduce_swapped_surface_and_actions_is_a_clear_error():
    red = BlockHistoryReduce(2, 2, 8, num_actions=19)
    hashes, post, author, surface, actions = _history_inputs()
    with pytest.raises(ValueError, match="look swapped.*history_product_surface, history_actions"):
        red(hashes, post, author, actions, surface)  # the pre-0.2 order
    with pytest.raises(ValueError, match="look swapped"):
        red(hashes, post, author, history_product_surface=actions, history_actions=surface)


def test_history_reduce_bad_surface_or_actions_name_the_field():
    red = BlockHistoryReduce(2, 2, 8, num_actions=19)
    hashes, post, author, surface, actions = _history_inputs()
    with pytest.raises(
        ValueError, match=r"history_product_surface has shape \[2, 3\], expected \[2, 4\]"
    ):
        red(hashes, post, author, surface[:, :3], actions)
    with pytest.raises(ValueError, match="history_product_surface has dtype torch.float32"):
        red(hashes, post, author, surface.float(), actions)
    with pytest.raises(
        ValueError, match=r"history_actions has shape \[2, 4\], expected \[2, 4, 19\]"
    ):
        red(hashes, post, author, surface, actions[..., 0])  # 2-D actions, 2-D surface
    with pytest.raises(ValueError, match="actions has 18 actions, expected 19"):
        red(hashes, post, author, surface, actions[..., :18])
