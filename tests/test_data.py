import json

import numpy as np
import pytest
import torch

from hashrec import HashConfig
from hashrec.data import (
    ExampleConfig,
    LogSchema,
    RowHashes,
    batches,
    build_requests,
    load_kuairand,
    load_log,
)
from hashrec.datasets import kuairand_sample_dir

from conftest import SCHEMA_JSON, write_synthetic_log


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "log.csv"
    write_synthetic_log(path)
    return load_log(str(path), LogSchema.from_dict(json.loads(SCHEMA_JSON)))


def test_generic_log_reading(log):
    assert log.actions == ("click", "like", "hate") and log.negative_actions == ("hate",)
    assert log.continuous.shape == (len(log), 1) and (log.continuous >= 0).all()
    assert (np.diff(log.time) >= 0).all()  # sorted by time
    assert log.day.min() == 20220425 and log.day.max() <= 20220430


@pytest.mark.parametrize("window", [0.0, 3600.0, 1e9])
@pytest.mark.parametrize("C", [1, 3, 16])
def test_requests_never_leak_and_cover_every_candidate(log, window, C):
    cand = log.days(20220428, None)
    cfg = ExampleConfig(history_len=5, max_candidates=C, slate_window_s=window)
    r = build_requests(log, cand, cfg)
    rows = r.candidates[r.candidates >= 0]
    assert sorted(rows.tolist()) == np.flatnonzero(cand).tolist()  # each candidate exactly once
    for u, h, c in zip(r.user_row, r.history, r.candidates, strict=True):
        c, h = c[c >= 0], h[h >= 0]
        assert len(c) and (log.user[c] == log.user[u]).all() and (log.user[h] == log.user[u]).all()
        assert log.time[h].max(initial=-1) < log.time[c].min()  # strictly before the slate
        assert (np.diff(log.time[h]) >= 0).all() and (np.diff(log.time[c]) >= 0).all()
        if len(c) > 1:
            assert np.diff(log.time[c]).max() <= window * 1000
        # the history is the most recent S rows before the slate
        earlier = np.flatnonzero((log.user == log.user[u]) & (log.time < log.time[c].min()))
        assert set(h.tolist()) <= set(earlier.tolist()) and len(h) == min(5, len(earlier))
        left_out = np.setdiff1d(earlier, h)
        assert log.time[left_out].max(initial=-1) <= log.time[h].min(initial=2**62)


def test_history_is_exactly_the_latest_rows():
    from hashrec.data import InteractionLog

    t = np.array([1, 2, 3, 4, 5, 5, 6]) * 1000
    log = InteractionLog(
        user=np.array([7, 7, 7, 7, 7, 7, 7]),
        post=np.arange(1, 8),
        author=np.ones(7, int),
        surface=np.zeros(7, int),
        time=t,
        day=np.full(7, 20220101),
        labels=np.zeros((7, 1), np.uint8),
        continuous=np.zeros((7, 0), np.float32),
        actions=("click",),
    )
    cand = np.array([0, 0, 0, 0, 1, 1, 1], bool)
    r = build_requests(log, cand, ExampleConfig(history_len=3, max_candidates=2, slate_window_s=10))
    assert r.candidates.tolist() == [[4, 5], [6, -1]]
    assert r.history.tolist() == [[1, 2, 3], [3, 4, 5]]  # second slate sees the first one's rows


def test_batches_labels_masks_and_negatives(log):
    cfg = HashConfig.uniform(num_buckets=64)
    train = log.days(None, 20220427)
    r = build_requests(
        log,
        train,
        ExampleConfig(history_len=4, max_candidates=3, negatives_per_request=2),
        negative_pool=np.flatnonzero(train),
    )
    lb = next(batches(log, RowHashes(log, cfg), r, 8))
    batch, labels, mask, cont, rows = (
        lb.batch,
        lb.labels,
        lb.label_mask,
        lb.continuous,
        lb.candidate_rows,
    )
    assert batch.candidate_post_hashes.shape == (8, 5, 2) and labels.shape == (8, 5, 3)
    assert (labels[:, 3:] == 0).all() and (cont[:, 3:] == 0).all() and (rows[:, 3:] == -1).all()
    assert not mask[:, 3:, 2].any() and mask[:, 3:, :2].all()  # no 'hate' loss on sampled posts
    assert mask[:, :3].all()
    real = rows[:, :3]
    np.testing.assert_array_equal(labels[:, :3][real >= 0].numpy(), log.labels[real[real >= 0]])
    batch.validate(cfg, num_actions=3, num_surfaces=16)
    assert torch.equal(
        batch.history_post_hashes[batch.history_post_hashes[..., 0] == 0],
        torch.zeros_like(batch.history_post_hashes[batch.history_post_hashes[..., 0] == 0]),
    )


def test_shipped_kuairand_sample_reads_like_the_official_layout():
    log = load_kuairand(kuairand_sample_dir())
    assert len(log) > 50_000 and log.actions[:3] == ("click", "long_view", "like")
    assert log.user.min() >= 1 and log.post.min() >= 1 and log.author.min() >= 1  # id 0 -> 1
    assert set(np.unique(log.day).tolist()) <= set(range(20220425, 20220506))
    assert "duration_ms" in log.extra


def test_bad_inputs(tmp_path):
    schema = LogSchema.from_dict(json.loads(SCHEMA_JSON))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_log(str(empty), schema)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_log(str(tmp_path / "missing.csv"), schema)
    p = tmp_path / "cols.csv"
    p.write_text("uid,item\n1,2\n")
    with pytest.raises(ValueError, match=r"missing columns \['creator'|missing columns \['ts'"):
        load_log(str(p), schema)
    path = tmp_path / "log.csv"
    write_synthetic_log(path)
    text = path.read_text().splitlines()
    bad = [*text[:2], text[2].rsplit(",", 4)[0] + ",7,0,0,5", *text[3:]]
    path.write_text("\n".join(bad) + "\n")
    with pytest.raises(ValueError, match="action column clicked holds values other than 0/1"):
        load_log(str(path), schema)
    with pytest.raises(ValueError, match="negative_actions"):
        LogSchema(actions=(("click", "c"),), negative_actions=("hate",))
    with pytest.raises(ValueError, match="unknown schema fields"):
        LogSchema.from_dict({"bogus": 1})
    gib = tmp_path / "gib.parquet"
    gib.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable"):
        load_log(str(gib), schema)
