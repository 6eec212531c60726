import json
import re
import shutil

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
    # candidate columns: as many as the fullest slate of the batch, then the 2 negatives
    n = int((r.candidates[:8] >= 0).sum(1).max())
    assert 1 <= n <= 3
    assert batch.candidate_post_hashes.shape == (8, n + 2, 2) and labels.shape == (8, n + 2, 3)
    assert (labels[:, n:] == 0).all() and (cont[:, n:] == 0).all() and (rows[:, n:] == -1).all()
    assert not mask[:, n:, 2].any() and mask[:, n:, :2].all()  # no 'hate' loss on sampled posts
    assert mask[:, :n].all()
    real = rows[:, :n]
    np.testing.assert_array_equal(real, r.candidates[:8, :n])
    np.testing.assert_array_equal(labels[:, :n][real >= 0].numpy(), log.labels[real[real >= 0]])
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


# ---- hardening: every bad input refused with the column, row and value -----------------------


def _write(path, **cols):
    names = list(cols)
    rows = zip(*cols.values(), strict=True)
    path.write_text(",".join(names) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return str(path)


T0 = 1_650_844_800_000  # 2022-04-25 00:00 UTC in ms
SIMPLE = LogSchema(user="u", post="p", author="a", time="t", actions=(("click", "c"),))


def _simple(tmp_path, *, u=(1, 2, 3), p=(10, 11, 12), a=(5, 5, 6), t=None, schema=SIMPLE,
            **extra):  # fmt: skip
    t = t if t is not None else [T0 + i * 1000 for i in range(len(u))]
    path = _write(tmp_path / "log.csv", u=u, p=p, a=a, t=t, c=[1] * len(u), **extra)
    return load_log(path, schema)


@pytest.mark.parametrize(
    ("column", "values", "offset", "message"),
    [
        ("p", ("10", "1.5", "12"), 0, "column p row 2 holds 1.5: IDs must be integers"),
        ("p", ("10", "9223372036854775808", "12"), 0, "row 2 holds 9.223372036854776e+18"),
        ("u", ("1", "-1", "3"), 1, "row 2 holds -1: with id_offset 1 it becomes 0, the padding"),
        ("u", ("1", "0", "3"), 0, '"id_offset": 1'),
        ("a", ("5", "9223372036854775807", "6"), 1, "must be at most 2^63-1"),
        ("u", ("1", "-7", "3"), 0, "row 2 holds -7: IDs + id_offset 0 must be >= 1"),
        ("u", ("x", "", "z"), 0, "row 2 holds '': an empty ID"),
    ],
)
def test_ids_must_be_integers_in_range_after_the_offset(tmp_path, column, values, offset, message):
    schema = LogSchema(**{**SIMPLE.__dict__, "id_offset": offset})
    cols = {"u": (1, 2, 3), "p": (10, 11, 12), "a": (5, 5, 6), column: values}
    with pytest.raises(ValueError, match=re.escape(message)):
        _simple(tmp_path, schema=schema, **cols)


def test_string_ids_hash_through_xxh64(tmp_path):
    from hashrec.hashing.functions import ids_to_int64

    log = _simple(tmp_path, u=("alice", "bob", "alice"), p=("v1", "v2", "v3"))
    assert (log.user != 0).all() and log.user[0] == log.user[2] != log.user[1]
    assert log.user[0] == ids_to_int64(["alice"])[0]  # same bits in every process
    assert sorted(log.post.tolist()) == sorted(ids_to_int64(["v1", "v2", "v3"]).tolist())


def test_dates_times_and_units_are_checked(tmp_path):
    dated = LogSchema(**{**SIMPLE.__dict__, "date": "d"})
    t = [T0, T0 + 1000, T0 + 2000]
    with pytest.raises(ValueError, match="row 2 holds 20221345: not a date yyyymmdd"):
        _simple(tmp_path, schema=dated, t=t, d=(20220425, 20221345, 20220425))
    with pytest.raises(ValueError, match=r"row 3: d 20220430 disagrees with its time \(2022-04"):
        _simple(tmp_path, schema=dated, t=t, d=(20220425, 20220425, 20220430))
    ok = _simple(tmp_path, schema=dated, t=t, d=(20220425, 20220424, 20220426))  # time zones
    assert sorted(ok.day.tolist()) == [20220424, 20220425, 20220426]
    with pytest.raises(ValueError, match="column t row 2 holds -5: times must be finite and >= 0"):
        _simple(tmp_path, t=(T0, -5, T0))
    seconds = LogSchema(**{**SIMPLE.__dict__, "time_unit": "s"})
    with pytest.raises(ValueError, match="after the year 2100; is the column in 'ms'"):
        _simple(tmp_path, schema=seconds, t=t)


def test_one_author_per_post(tmp_path):
    with pytest.raises(ValueError, match="p 10 is listed with two a values"):
        _simple(tmp_path, p=(10, 10, 12), a=(5, 6, 7))
    path = _write(tmp_path / "log.csv", u=(1, 2), p=(10, 11), t=(T0, T0 + 1), c=(1, 0))
    table = _write(tmp_path / "authors.csv", p=(10, 11, 11), a=(5, 6, 7))
    with pytest.raises(ValueError, match="authors.csv: p 11 is listed with two a values"):
        load_log(path, SIMPLE, authors=table)
    _write(tmp_path / "authors.csv", p=(10, 11, 11), a=(5, 6, 6))  # a repeated pair is fine
    assert load_log(path, SIMPLE, authors=table).author.tolist() == [5, 6]


def test_row_order_is_canonical_on_user_time_ties(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    cols = {
        "u": rng.integers(1, 6, n), "p": np.arange(1, n + 1), "a": np.arange(1, n + 1) % 7 + 1,
        "t": T0 + rng.integers(0, 5, n) * 1000, "c": rng.integers(0, 2, n),
    }  # fmt: skip
    a = load_log(_write(tmp_path / "a.csv", **cols), SIMPLE)
    perm = rng.permutation(n)
    b = load_log(_write(tmp_path / "b.csv", **{k: v[perm] for k, v in cols.items()}), SIMPLE)
    for field in ("user", "post", "author", "time", "labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    r = [build_requests(x, x.days(), ExampleConfig(3, 2)) for x in (a, b)]
    np.testing.assert_array_equal(r[0].history, r[1].history)
    np.testing.assert_array_equal(r[0].candidates, r[1].candidates)


def _kuairand_folder(tmp_path, n=3000):
    import pyarrow.csv as pacsv

    src = kuairand_sample_dir()
    table = pacsv.read_csv(f"{src}/log_standard_4_25_to_5_05_sample.csv.gz").slice(0, n)
    folder = tmp_path / "kuairand"
    folder.mkdir()
    pacsv.write_csv(table.slice(0, n // 3), folder / "log_standard_4_08_to_4_21_pure.csv")
    pacsv.write_csv(table.slice(n // 3), folder / "log_standard_4_22_to_5_08_pure.csv")
    shutil.copy(f"{src}/video_features_basic_sample.csv.gz", folder)
    return folder, table


def test_kuairand_reads_every_log_file(tmp_path):
    import pyarrow.csv as pacsv

    folder, table = _kuairand_folder(tmp_path)
    heard = []
    log = load_kuairand(str(folder), say=heard.append)
    assert len(log) == table.num_rows  # both files, not only the first
    assert [h.split(": ")[1] for h in heard] == ["1,000 rows", "2,000 rows"]
    assert sorted(log.post.tolist()) == sorted((table.column("video_id").to_numpy() + 1).tolist())
    pacsv.write_csv(table.slice(0, 50), folder / "log_random_4_22_to_5_08_pure.csv")
    assert len(load_kuairand(str(folder))) == table.num_rows  # the random log only when asked
    assert len(load_kuairand(str(folder), with_random=True)) == table.num_rows + 50
    pacsv.write_csv(table.slice(0, 50).drop_columns(["tab"]),
                    folder / "log_standard_4_22_to_5_08_pure.csv")  # fmt: skip
    with pytest.raises(ValueError, match=r"columns differ: \['tab'\]"):
        load_kuairand(str(folder))
    (folder / "log_standard_4_22_to_5_08_pure.csv.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="hold the same data twice"):
        load_kuairand(str(folder))


@pytest.mark.parametrize("window", [-5.0, float("nan"), float("inf")])
def test_slate_window_must_be_finite_and_non_negative(window):
    with pytest.raises(ValueError, match="slate_window_s must be a finite number >= 0"):
        ExampleConfig(slate_window_s=window)
