"""Table layouts: hybrid (frequency map), importance-weighted, quotient-remainder."""

import json

import numpy as np
import pytest
import torch

from hashrec import HashConfig, PhoenixRanker, RankerConfig, TransformerConfig
from hashrec.data import LogSchema, load_log
from hashrec.data.tables import frequency_map, row_bytes, table_config
from hashrec.hashing.config import EntityHash
from hashrec.hashing.layouts import local_indices_reference
from hashrec.nn import layouts
from hashrec.nn.layouts import (
    apply_layouts,
    lookup_layouts,
    weighted_combine,
    weighted_combine_reference,
    weighted_lookup,
)
from hashrec.nn.optim import RowWiseAdagrad
from hashrec.nn.table import FusedEmbeddingTable, gather_rows
from hashrec.training.checkpoint import load_checkpoint, save_checkpoint

from conftest import SCHEMA_JSON, cli_error, make_batch, write_synthetic_log

HEAD = (3, 17, 99, 2**40 + 5)
ENTITIES = {
    "multihash": EntityHash("post", 2, 50, seed=2),
    "hybrid": EntityHash("post", 2, 50, seed=2, layout="hybrid", head_ids=HEAD),
    "qr": EntityHash("post", 2, 20, seed=2, layout="qr", extra_rows=15),
    "qr, two hashes": EntityHash("post", 2, 100_000, seed=2, layout="qr", extra_rows=90_000),
    "weighted": EntityHash("post", 3, 50, seed=2, layout="weighted", extra_rows=9),
}


def _config(layout: str, k: int = 2) -> HashConfig:
    def ent(name, n, seed, head):
        if layout == "hybrid":
            return EntityHash(name, k, n, seed=seed, layout="hybrid", head_ids=head)
        if layout in ("qr", "weighted"):
            kk = 2 if layout == "qr" else k
            return EntityHash(name, kk, n, seed=seed, layout=layout, extra_rows=n // 3)
        return EntityHash(name, k, n, seed=seed)

    ids = tuple(range(1, 10_000, 997))
    return HashConfig(entities=(ent("user", 61, 1, ids), ent("post", 97, 2, ids),
                                ent("author", 31, 3, ids[:3])))  # fmt: skip


@pytest.mark.parametrize("layout", list(ENTITIES))
def test_local_indices_match_the_reference_and_stay_in_the_block(layout):
    e = ENTITIES[layout]
    rng = np.random.default_rng(0)
    ids = np.concatenate([[0, *HEAD], rng.integers(1, 2**62, 500), rng.integers(1, 200, 200)])
    got = e.local(ids)
    assert got.shape == (len(ids), e.num_slots)
    assert got.tolist() == local_indices_reference(e, ids.tolist())
    assert (got[0] == 0).all() and (got[1:] >= 1).all() and (got < e.block_rows).all()
    cfg = HashConfig(entities=(EntityHash("user"), e, EntityHash("author", num_buckets=10)))
    t = torch.from_numpy(ids)
    assert torch.equal(cfg.rows_torch("post", t), torch.from_numpy(cfg.rows("post", ids)))


def test_hybrid_head_ids_own_private_rows_and_unseen_ids_fall_to_the_tail():
    e, plain = ENTITIES["hybrid"], ENTITIES["multihash"]
    head = e.local(np.array(HEAD))
    assert sorted(head[:, 0].tolist()) == list(range(50, 50 + len(HEAD)))  # one row each
    assert (head == head[:, :1]).all()  # repeated in every slot
    tail = np.array([4, 5, 1000, 2**50])
    assert np.array_equal(e.local(tail), plain.local(tail))  # the Phoenix multi-hash
    assert (e.local(tail) < 50).all()


def test_qr_gives_distinct_ids_distinct_row_pairs_unless_their_mix_collides():
    e = EntityHash("post", 2, 101, seed=5, layout="qr", extra_rows=100)  # U = 10,000
    ids = np.arange(1, 301)
    loc = e.local(ids)
    pairs = {tuple(r) for r in loc.tolist()}
    # 300 IDs into 10,000 values: a handful of collisions at most, far fewer than the rows shared
    assert len(pairs) >= 290 and len(np.unique(loc[:, 0])) < 100
    assert (loc[:, 0] < 101).all() and (loc[:, 1] >= 101).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "cuckoo"}, "layout must be one of"),
        ({"layout": "qr", "extra_rows": 0}, "needs extra_rows >= 1"),
        ({"layout": "qr", "extra_rows": 5, "num_hashes": 3}, "has 2 slots"),
        ({"layout": "hybrid", "head_ids": (5, 3)}, "sorted, unique and non-zero"),
        ({"layout": "hybrid", "head_ids": (0, 3)}, "sorted, unique and non-zero"),
        ({"head_ids": (5,)}, "head_ids are for the hybrid layout"),
        ({"extra_rows": 5}, "extra_rows is for qr/weighted"),
        ({"layout": "hybrid", "scheme": "identity", "num_hashes": 1}, "identity scheme has no"),
    ],
)
def test_bad_layouts_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EntityHash("post", **{"num_buckets": 50, **kwargs})


def test_weighted_combine_matches_the_reference_in_outputs_and_gradients():
    torch.manual_seed(0)
    rows = torch.randint(0, 1000, (3, 5, 3))  # K = 2 components + the weight row
    v1 = torch.randn(3, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    v2 = v1.detach().clone().requires_grad_(True)
    a, b = weighted_combine(rows, v1), weighted_combine_reference(rows, v2)
    assert a.shape == (3, 5, 2, 8)
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(v1.grad, v2.grad)
    assert v1.grad[..., 2, :].abs().sum() > 0  # the weight row learns


def _weighted_rows(n: int = 40) -> tuple[HashConfig, torch.Tensor]:
    """Rows of a weighted post block between two other entities' blocks, some IDs padding."""
    cfg = _config("weighted", k=3)
    ids = np.random.default_rng(0).integers(1, 60, n)  # repeats: rows shared by several IDs
    ids[::7] = 0
    return cfg, torch.from_numpy(cfg.rows("post", ids)).view(4, n // 4, -1)  # [4, n/4, K+1]


def _twin_tables(cfg: HashConfig, sparse: bool, dim: int = 9, dtype=torch.float32):
    torch.manual_seed(1)
    a = FusedEmbeddingTable.from_config(cfg, dim, sparse=sparse, dtype=dtype)
    with torch.no_grad():  # weights away from 0, so a wrong column or row shows
        a.weight[1:].uniform_(-0.8, 0.8)
    b = FusedEmbeddingTable.from_config(cfg, dim, sparse=sparse, dtype=dtype)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("rows_from", ["layout", "any rows"])
def test_weighted_lookup_matches_the_reference_in_outputs_and_table_gradients(sparse, rows_from):
    cfg, rows = _weighted_rows()
    if rows_from == "any rows":  # component and weight rows interleave and collide
        rows = torch.randint(0, 12, rows.shape)
        rows[0, 0] = 0
    fast, ref = _twin_tables(cfg, sparse)
    a = weighted_lookup(fast, rows)
    b = weighted_combine_reference(rows, ref(rows))
    assert a.shape == (*rows.shape[:-1], 3, 9)
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    ga, gb = fast.weight.grad, ref.weight.grad
    assert ga.is_sparse == sparse
    if sparse:  # one entry per touched row, ascending, no padding: the optimizer sorts nothing
        idx = ga._indices()[0]
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) > 0
    torch.testing.assert_close(ga.to_dense(), gb.to_dense())
    weight_rows = rows[..., -1][rows[..., -1] > 0].unique()
    assert ga.to_dense()[weight_rows].abs().sum() > 0  # the weight rows learn


def test_weighted_lookup_and_row_wise_adagrad_match_the_dense_reference_update():
    cfg, rows = _weighted_rows()
    fast, ref = _twin_tables(cfg, sparse=True)
    opt = RowWiseAdagrad(fast.parameters(), lr=0.1)
    g = torch.randn(*rows.shape[:-1], 3, 9)
    for _ in range(2):  # the second step reads the accumulator the first one wrote
        (weighted_lookup(fast, rows) * g).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    w, acc = ref.weight.detach().clone(), torch.zeros(ref.num_rows)
    for _ in range(2):  # the formula, on the reference path's dense gradient
        v = w.clone().requires_grad_(True)
        (weighted_combine_reference(rows, v[rows]) * g).sum().backward()
        touched = v.grad.ne(0).any(1)
        touched[0] = False
        acc[touched] += v.grad[touched].square().mean(1)
        w[touched] -= 0.1 * v.grad[touched] / (acc[touched].sqrt() + 1e-8)[:, None]
    torch.testing.assert_close(fast.weight.detach(), w)
    torch.testing.assert_close(opt.state[fast.weight]["sum"], acc)
    assert (fast.weight[0] == 0).all()


def test_weighted_lookup_in_bfloat16_follows_the_combine_path():
    cfg, rows = _weighted_rows()
    fast, ref = _twin_tables(cfg, sparse=True, dtype=torch.bfloat16)
    a, b = weighted_lookup(fast, rows), weighted_combine(rows, ref(rows))
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(
        fast.weight.grad.to_dense().float(), ref.weight.grad.to_dense().float(), atol=0.1, rtol=0.02
    )


def test_weighted_lookup_on_a_sharded_table_takes_the_combine_path():
    cfg, rows = _weighted_rows()
    fast, ref = _twin_tables(cfg, sparse=True)
    fast.backend = lambda flat: gather_rows(fast.weight, flat)  # stands in for the shards
    torch.testing.assert_close(
        weighted_lookup(fast, rows), weighted_combine_reference(rows, ref(rows))
    )


def test_rowwise_dot_across_chunks(monkeypatch):
    monkeypatch.setattr(layouts, "_DOT_CHUNK", 4)  # 10 rows: chunks of 4, 4 and 2
    torch.manual_seed(0)
    a, b = torch.randn(10, 5), torch.randn(10, 5)
    torch.testing.assert_close(layouts._rowwise_dot(a, b), (a * b).sum(-1))


def test_weighted_lookup_gradient_where_a_weight_is_exactly_minus_one():
    cfg, rows = _weighted_rows()
    fast, ref = _twin_tables(cfg, sparse=True)
    with torch.no_grad():  # scale 1 + w = 0: the output is 0, the weight's gradient is not
        for t in (fast, ref):
            t.weight[rows[..., -1]] = -1.0
    a, b = weighted_lookup(fast, rows), weighted_combine_reference(rows, ref(rows))
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(fast.weight.grad.to_dense(), ref.weight.grad.to_dense())
    assert fast.weight.grad.to_dense()[rows[0, 1, -1]].abs().sum() > 0


@pytest.mark.parametrize("mix", ["all weighted", "weighted posts, k=3", "no weighted"])
def test_lookup_layouts_matches_apply_layouts_over_the_whole_batch(mix):
    cfg = _config("weighted")
    if mix != "all weighted":  # other entities plain multi-hash: one gather beside the weights
        ents = _config("multihash").entities
        post = _config("weighted", k=3)["post"] if mix.startswith("weighted") else ents[1]
        cfg = HashConfig(entities=(ents[0], post, ents[2]))
    batch = make_batch(cfg, A=2)
    fast, ref = _twin_tables(cfg, sparse=True)
    a, b = lookup_layouts(cfg, batch, fast), apply_layouts(cfg, batch, ref.lookup(batch))
    loss_a = loss_b = 0
    for name in ("user", "history_post", "history_author", "candidate_post", "candidate_author"):
        x, y = getattr(a, f"{name}_embeddings"), getattr(b, f"{name}_embeddings")
        torch.testing.assert_close(x, y)
        g = torch.randn_like(x)
        loss_a, loss_b = loss_a + (x * g).sum(), loss_b + (y * g).sum()
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(fast.weight.grad.to_dense(), ref.weight.grad.to_dense())


def test_weighted_layout_needs_k_at_most_d():
    with pytest.raises(ValueError, match="1 <= K <= D, got K=5, D=4"):
        weighted_lookup(FusedEmbeddingTable(20, 4), torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="got K=0"):
        weighted_combine(torch.ones(2, 1, dtype=torch.int64), torch.ones(2, 1, 4))


@pytest.mark.parametrize("layout", ["multihash", "hybrid", "qr", "weighted"])
def test_ranker_trains_each_layout_in_one_fused_table(layout):
    cfg = RankerConfig(
        hash=_config(layout),
        transformer=TransformerConfig(dim=8, num_layers=1, num_q_heads=2, num_kv_heads=1),
        actions=("click", "like"),
        continuous_actions=(),
    )
    torch.manual_seed(0)
    model = PhoenixRanker(cfg)
    assert model.table.weight.shape[0] == cfg.hash.num_rows
    batch = make_batch(cfg.hash, A=2)
    opt = RowWiseAdagrad([model.table.weight], lr=0.1)
    before = model.table.weight.detach().clone()
    model(batch).logits.sum().backward()
    opt.step()
    changed = set((model.table.weight != before).any(1).nonzero().squeeze(1).tolist())
    touched = set()
    for f in ("user_hashes", "history_post_hashes", "history_author_hashes",
              "candidate_post_hashes", "candidate_author_hashes"):  # fmt: skip
        touched |= set(getattr(batch, f).unique().tolist())
    assert changed and changed <= touched - {0}  # only touched rows move; padding never
    assert (model.table.weight[0] == 0).all()


def test_checkpoint_keeps_the_layout_and_the_frequency_map(tmp_path):
    cfg = RankerConfig(
        hash=_config("hybrid"),
        transformer=TransformerConfig(dim=8, num_layers=1, num_q_heads=2, num_kv_heads=1),
        actions=("click",),
        continuous_actions=(),
    )
    model = PhoenixRanker(cfg)
    save_checkpoint(tmp_path / "m.safetensors", model)
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.config == cfg and loaded.config.hash["post"].head_ids == cfg.hash["post"].head_ids
    batch = make_batch(cfg.hash, A=1)
    model.eval(), loaded.eval()
    assert torch.equal(model(batch).logits, loaded(batch).logits)
    mem = model.table.memory_report()
    assert mem.frequency_map_bytes == 8 * sum(len(e.head_ids) for e in cfg.hash.entities) > 0
    assert mem.total_bytes == mem.table_bytes + mem.frequency_map_bytes
    assert "frequency map" in str(mem)


def test_frequency_map_counts_training_days_only(tmp_path):
    path = tmp_path / "log.csv"
    write_synthetic_log(path)
    log = load_log(str(path), LogSchema.from_dict(json.loads(SCHEMA_JSON)))
    train = log.days(None, 20220428)
    cfg = table_config(log, train, "hybrid", fraction=0.5, num_hashes=2, dim=8)
    head = set(cfg["post"].head_ids)
    counts = {int(p): int((log.post[train] == p).sum()) for p in np.unique(log.post)}
    assert head and all(counts[p] > 0 for p in head)  # never an ID seen only later
    assert min(counts[p] for p in head) >= max(c for p, c in counts.items() if p not in head)
    assert frequency_map(np.array([5, 5, 2, 2, 9]), 2).tolist() == [2, 5]  # ties: smaller ID


def _wide_log(tmp_path):
    """A synthetic log of 300 users and 900 posts, its path and its training days' mask."""
    path = tmp_path / "log.csv"
    write_synthetic_log(path, n_users=300, n_posts=900)
    log = load_log(str(path), LogSchema.from_dict(json.loads(SCHEMA_JSON)))
    return path, log, log.days(None, 20220428)


def test_head_share_moves_bytes_between_private_rows_and_the_tail(tmp_path, capsys):
    from hashrec.cli import common
    from hashrec.data import tables
    from hashrec.hashing.layouts import LAYOUTS

    path, log, train = _wide_log(tmp_path)
    rb = row_bytes(16)

    def post(share: float) -> EntityHash:
        return table_config(log, train, "hybrid", 0.25, 2, dim=16, head_share=share)["post"]

    lo, hi, none = post(0.3), post(0.85), post(0.0)
    assert len(none.head_ids) == 0 and len(lo.head_ids) < len(hi.head_ids)
    assert hi.num_buckets < lo.num_buckets  # the private rows are paid for by the tail
    for e in (lo, hi):  # the same bytes either way (rows + their 8-byte frequency-map entries)
        spent = (len(e.head_ids) + e.num_buckets) * rb + 8 * len(e.head_ids)
        assert abs(spent - (len(none.head_ids) + none.num_buckets) * rb) <= 2 * rb
    with pytest.raises(ValueError, match="head_share must be in"):
        post(1.0)
    # the CLI's copies of the library's constants (kept apart so --help imports no torch)
    assert common.DEFAULT_HEAD_SHARE == tables.HEAD_SHARE
    assert set(common.TABLE_SCHEMES) == set(tables.TABLE_SCHEMES) == set(LAYOUTS)
    argv = ["train", "--data", str(path), "--schema", SCHEMA_JSON, "--train-end", "2022-04-28",
            "--eval-start", "2022-04-29", "--head-share", "1", "--out", str(tmp_path / "o")]  # fmt: skip
    assert "--head-share must be in [0, 1)" in cli_error(argv, capsys, 2)


@pytest.mark.parametrize("layout", ["multihash", "hybrid", "qr", "weighted"])
def test_table_config_spends_equal_bytes(tmp_path, layout):
    _, log, train = _wide_log(tmp_path)
    rb = row_bytes(16)
    plain = table_config(log, train, "multihash", 0.25, 2, dim=16)
    cfg = table_config(log, train, layout, 0.25, 2, dim=16)
    budget = plain.num_rows * rb
    spent = cfg.num_rows * rb + cfg.frequency_map_bytes
    assert budget - 3 * rb <= spent <= budget  # equal to within a row per entity


def test_cli_table_scheme(tmp_path, capsys):
    from hashrec.cli import main

    path = tmp_path / "log.csv"
    write_synthetic_log(path)
    out = tmp_path / "run"
    tiny = ["--dim", "8", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--history-len",
            "6", "--max-candidates", "4", "--batch-size", "16", "--epochs", "1"]  # fmt: skip
    base = ["train", "--data", str(path), "--schema", SCHEMA_JSON, "--train-end", "2022-04-28",
            "--eval-start", "2022-04-29", "--out", str(out), *tiny]  # fmt: skip
    assert main([*base, "--table-scheme", "hybrid", "--entity-weights", "none"]) == 0
    assert "| hashed hybrid k=2, 25% bytes |" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())["hash"]["entities"]
    assert all(e["layout"] == "hybrid" and e["head_ids"] for e in saved)
    err = cli_error([*base, "--table-scheme", "bloom"], capsys, 2)
    assert "invalid choice: 'bloom'" in err


def test_collisions_hybrid_reports_private_row_impressions(tmp_path, capsys):
    from hashrec.cli import main

    path = tmp_path / "log.csv"
    write_synthetic_log(path)
    out = tmp_path / "out"
    argv = ["collisions", "--hybrid", "0.5", "--data", str(path), "--schema", SCHEMA_JSON,
            "--train-end", "2022-04-28", "--eval-start", "2022-04-29", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "| post |" in capsys.readouterr().out
    rows = {r["entity"]: r for r in json.loads((out / "hybrid.json").read_text())}
    log = load_log(str(path), LogSchema.from_dict(json.loads(SCHEMA_JSON)))
    train = log.days(None, 20220428)
    head = table_config(log, train, "hybrid", 0.5, 2, dim=32)["post"].head_ids
    assert rows["post"]["train_private"] == int(np.isin(log.post[train], head).sum()) > 0
    assert rows["post"]["train_impressions"] == int(train.sum())
    err = cli_error([*argv[:3], "--csv", "x.csv"], capsys, 2)
    assert "--hybrid reads a log" in err


def test_demo_path_shows_the_scheme_and_plain_phoenix(tmp_path, capsys):
    from hashrec.cli import common
    from hashrec.cli.dispatch import build_parser
    from hashrec.cli.train import run_experiment

    path = tmp_path / "log.csv"
    write_synthetic_log(path)
    tiny = ["--dim", "8", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--history-len",
            "6", "--max-candidates", "4", "--batch-size", "16", "--epochs", "1"]  # fmt: skip
    args = build_parser().parse_args(
        [
            "train",
            "--data",
            str(path),
            "--schema",
            SCHEMA_JSON,
            "--eval-start",
            "2022-04-29",
            "--out",
            str(tmp_path / "run"),
            "--table-scheme",
            "qr",
            *tiny,
        ]
    )
    run_experiment(args, common.load_data(args), 20220428, with_full_table=False,
                   with_phoenix=True)  # fmt: skip
    out = capsys.readouterr().out
    assert "| hashed qr, 25% bytes |" in out and "| hashed k=2, 25% rows |" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["results"]
    assert {"hashed qr, 25% bytes", "hashed k=2, 25% rows"} <= set(metrics)


def test_hybrid_is_the_default_and_plain_phoenix_one_flag_away():
    from hashrec.cli.dispatch import build_parser

    parser = build_parser()
    for cmd in ("train", "demo"):
        assert parser.parse_args([cmd]).table_scheme == "hybrid"
        assert parser.parse_args([cmd, "--table-scheme", "multihash"]).table_scheme == "multihash"
