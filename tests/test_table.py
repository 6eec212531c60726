import pytest
import torch
from torch import nn

from hashrec import FusedEmbeddingTable, MultiHashEmbedding, RowWiseAdagrad
from hashrec.nn.table import gather_rows, segment_sum

from conftest import make_batch


def _per_hash_tables(fused: MultiHashEmbedding) -> nn.ModuleList:
    """The notebook's reference: one nn.Embedding(padding_idx=0) per hash, same weights."""
    V, D = fused.vocab_size, fused.dim
    tables = nn.ModuleList(nn.Embedding(V, D, padding_idx=0) for _ in range(fused.num_hashes))
    with torch.no_grad():
        for j, t in enumerate(tables):
            t.weight.copy_(fused.weight[j * V : (j + 1) * V])
            t.weight[0].zero_()
    return tables


@pytest.mark.parametrize("sparse", [False, True])
def test_fused_matches_one_embedding_per_hash_outputs_and_grads(sparse):
    torch.manual_seed(0)
    V, D, K = 50, 6, 3
    fused = MultiHashEmbedding(V, D, K, sparse=sparse)
    tables = _per_hash_tables(fused)
    hashes = torch.randint(0, V, (7, 5, K))
    hashes[0, 0] = 0
    hashes[1, :, 0] = 3  # repeated rows: gradients must accumulate
    upstream = torch.randn(7, 5, K, D)
    out = fused(hashes)
    ref = torch.stack([t(hashes[..., j]) for j, t in enumerate(tables)], dim=-2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    g = fused.weight.grad.to_dense() if sparse else fused.weight.grad
    for j, t in enumerate(tables):
        block = g[j * V : (j + 1) * V].clone()
        if j > 0:
            assert block[0].abs().sum() == 0  # unused row j*V never gets a gradient
            block[0] = 0
        torch.testing.assert_close(block, t.weight.grad)
    assert g[0].abs().sum() == 0


def test_table_lookup_equals_per_field_gathers(small_config):
    torch.manual_seed(0)
    table = FusedEmbeddingTable.from_config(small_config, dim=4)
    batch = make_batch(small_config)
    emb = table.lookup(batch)
    w = table.weight
    torch.testing.assert_close(emb.user_embeddings, w[batch.user_hashes])
    torch.testing.assert_close(emb.history_post_embeddings, w[batch.history_post_hashes])
    torch.testing.assert_close(emb.candidate_author_embeddings, w[batch.candidate_author_hashes])
    assert emb.history_post_embeddings[0, -1].abs().sum() == 0  # padding event -> zero vectors
    # gradients reach exactly the looked-up rows, never row 0
    sum(getattr(emb, f).sum() for f in vars(emb)).backward()
    touched = set(table.weight.grad.coalesce().indices()[0].tolist())
    looked_up = torch.cat(
        [getattr(batch, f).reshape(-1) for f in vars(batch) if f.endswith("hashes")]
    )
    assert touched == set(looked_up.tolist()) - {0}


def test_gather_backward_sums_duplicates_sparse_equals_dense():
    torch.manual_seed(1)
    w1 = torch.randn(20, 3, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_(True)
    idx = torch.tensor([4, 0, 4, 19, 7, 4, 0])
    up = torch.randn(7, 3)
    (gather_rows(w1, idx, sparse=True) * up).sum().backward()
    (gather_rows(w2, idx, sparse=False) * up).sum().backward()
    expected = torch.zeros(20, 3).index_add_(0, idx, up)
    expected[0] = 0
    torch.testing.assert_close(w1.grad.to_dense(), expected)
    torch.testing.assert_close(w2.grad, expected)


@pytest.mark.parametrize("scale", [False, True])
def test_segment_sum_on_int32_keys_equals_int64_and_a_plain_index_add(scale):
    """The table's size picks the sort's key width; both give the same rows (int64, ascending,
    no padding row) and sums, those of ``index_add_``, with ``tail`` zero rows after them."""
    torch.manual_seed(0)
    idx = torch.randint(0, 50, (400,))
    grad = torch.randn(400, 6)
    w = torch.rand(400) if scale else None
    wide = segment_sum(idx, grad, w, tail=2)
    narrow = segment_sum(idx, grad, w, tail=2, num_rows=50)
    expected = torch.zeros(50, 6).index_add_(0, idx, grad * (w[:, None] if scale else 1.0))
    rows = torch.unique(idx[idx > 0])
    for got_rows, got in (wide, narrow):
        assert got_rows.dtype == torch.int64 and torch.equal(got_rows, rows)
        torch.testing.assert_close(got[: len(rows)], expected[rows])
        assert not got[len(rows) :].any() and len(got) == len(rows) + 2
    torch.testing.assert_close(wide[1], narrow[1])


def _reference_rowwise_adagrad(w, acc, grad_dense, lr, eps):
    touched = grad_dense.ne(0).any(1)
    touched[0] = False
    acc = acc.clone()
    acc[touched] += grad_dense[touched].pow(2).mean(1)
    w = w.clone()
    w[touched] -= lr * grad_dense[touched] / (acc[touched].sqrt() + eps).unsqueeze(1)
    return w, acc


@pytest.mark.parametrize("sparse", [True, False])
def test_rowwise_adagrad_matches_reference_and_skips_padding(sparse):
    torch.manual_seed(2)
    table = FusedEmbeddingTable(30, 4, sparse=sparse)
    opt = RowWiseAdagrad(table.parameters(), lr=0.1, eps=1e-6)
    w, acc = table.weight.detach().clone(), torch.zeros(30)
    for _ in range(3):
        idx = torch.randint(0, 12, (10,))
        idx[0] = 0
        out = table(idx)
        (out * torch.randn_like(out)).sum().backward()
        g = table.weight.grad.to_dense() if sparse else table.weight.grad
        w, acc = _reference_rowwise_adagrad(w, acc, g, 0.1, 1e-6)
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(table.weight.detach(), w)
        torch.testing.assert_close(opt.state[table.weight]["sum"], acc)
    assert table.weight[0].abs().sum() == 0  # padding row: zero, never updated
    assert (table.weight[12:] == w[12:]).all() and acc[12:].abs().sum() == 0  # untouched rows


def test_bf16_table_trains_and_reports_memory():
    table = FusedEmbeddingTable(1000, 16, dtype=torch.bfloat16)
    opt = RowWiseAdagrad(table.parameters(), lr=0.05)
    idx = torch.tensor([1, 2, 2, 0])
    before = table.weight.detach().clone()
    out = table(idx)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    opt.step()
    changed = (table.weight != before).any(1)
    assert changed[1] and changed[2] and not changed[0] and not changed[3]
    rep = table.memory_report(opt)
    assert rep.table_bytes == 1000 * 16 * 2 and rep.optimizer_bytes == 1000 * 4
    assert rep.total_bytes == rep.table_bytes + rep.optimizer_bytes and "MiB" in str(rep)
    assert FusedEmbeddingTable(1000, 16).memory_report().optimizer_bytes == 0


def test_bad_indices_and_arguments(small_config):
    table = FusedEmbeddingTable(10, 4)
    with pytest.raises(ValueError, match=r"indices holds row 10, expected 0..9 \(table rows\)"):
        table(torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="indices holds row -1"):
        table(torch.tensor([-1]))
    with pytest.raises(ValueError, match="indices has dtype torch.float32"):
        table(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="dtype must be"):
        FusedEmbeddingTable(10, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="num_rows must be >= 2"):
        FusedEmbeddingTable(1, 4)
    small = FusedEmbeddingTable(50, 4)
    with pytest.raises(ValueError, match=r"user_hashes holds row \d+, expected 0..49"):
        small.lookup(make_batch(small_config))
    mhe = MultiHashEmbedding(10, 4, 2)
    with pytest.raises(ValueError, match=r"hashes has shape \[3, 3\], expected \[..., 2\]"):
        mhe(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="hashes holds 10, expected 0..9"):
        mhe(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match="lr must be > 0"):
        RowWiseAdagrad(table.parameters(), lr=0)


def test_padding_row_starts_zero_and_seeded_init_is_reproducible():
    torch.manual_seed(3)
    a = FusedEmbeddingTable(100, 8)
    torch.manual_seed(3)
    b = FusedEmbeddingTable(100, 8)
    assert a.weight[0].abs().sum() == 0
    assert torch.equal(a.weight, b.weight)
