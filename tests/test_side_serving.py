"""Serving a ranker trained with side features: the side features a served request gets are the
ones training built for the same rows (user and post tables by ID, the post's age at the
impression, the history events' signals, training's standardisation), through the library
(``side_batch``, ``RequestRanker``, ``RecommendPipeline``), ``hashrec recommend`` and the HTTP
service."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hashrec.data import ExampleConfig, LogSchema, RowHashes, batches, build_requests, load_log
from hashrec.data.side_store import side_batch
from hashrec.data.tables import table_config
from hashrec.evaluation.experiment import ModelSpec, ranker_config
from hashrec.models.ranker import PhoenixRanker
from hashrec.nn.side import SideBatch
from hashrec.nn.transformer import TransformerConfig
from hashrec.serving.rank import RankQuery, RequestRanker, to_batch, to_side_batch

from conftest import write_synthetic_log

SIDE_SCHEMA = {
    "user": "uid", "post": "item", "author": "creator", "surface": "tab", "time": "ts",
    "time_unit": "s", "actions": {"click": "clicked", "like": "liked"},
    "post_categorical": ["genre"], "post_numeric": ["length"], "post_time": "created",
    "user_categorical": ["level"], "user_numeric": ["fans"],
    "history_signals": [["watch_ratio", "watch_ms", "length"], ["watch", "watch_ms", ""]],
}  # fmt: skip
S, C = 6, 4


def _write_side_log(root) -> tuple[str, str, str]:
    """The synthetic log, a post table (some posts without a genre, posts 115.. without any
    feature value) and a user table (users 35.. absent): every missing-value path."""
    log = root / "log.csv"
    write_synthetic_log(log)
    rng = np.random.default_rng(1)
    rows = ["item,creator,genre,length,created"]
    for p in range(1, 121):
        genre = "" if p % 10 == 0 else ["news", "music", "cats"][p % 3]
        rows.append(f"{p},{p % 17 + 1},{genre},{int(rng.integers(5000, 90000))},"
                    f"2022-04-{p % 20 + 1:02d}" if p < 115 else f"{p},{p % 17 + 1},,,")  # fmt: skip
    posts = root / "posts.csv"
    posts.write_text("\n".join(rows) + "\n")
    users = root / "users.csv"
    users.write_text("uid,level,fans\n"
                     + "".join(f"{u},{'high' if u % 2 else 'low'},{u * 7}\n" for u in range(1, 35)))  # fmt: skip
    return str(log), str(posts), str(users)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("side_serving")
    log_path, posts, users = _write_side_log(root)
    log = load_log(log_path, LogSchema.from_dict(SIDE_SCHEMA), authors=posts, users=users)
    return {"root": root, "log_path": log_path, "posts": posts, "users": users, "log": log}


@pytest.fixture(scope="module")
def kuairand():
    from hashrec.data import load_kuairand
    from hashrec.datasets import kuairand_sample_dir

    return load_kuairand(kuairand_sample_dir())


def _training_batch(log, requests):
    """What training feeds the ranker for ``requests`` (collate's path), and its ranker."""
    train = log.days(None, 20220428)
    cfg = table_config(log, train, "hybrid", 0.25, 2, dim=8)  # the CLI's default layout
    spec = ModelSpec("t", cfg, TransformerConfig(dim=8, num_layers=1, num_q_heads=2,
                                                 num_kv_heads=1))  # fmt: skip
    torch.manual_seed(0)
    model = PhoenixRanker(ranker_config(log, spec)).eval()
    lb = next(batches(log, RowHashes(log, cfg), requests, batch_size=len(requests)))
    return model, lb


def _queries(log, requests, signals: tuple[str, ...]) -> list[RankQuery]:
    """The requests as a client sends them: raw IDs, the history's raw ``signals`` columns,
    each candidate's impression time."""
    out = []
    for i in range(len(requests)):
        h = requests.history[i][requests.history[i] >= 0]
        c = requests.candidates[i][requests.candidates[i] >= 0]
        out.append(RankQuery(
            int(log.user[requests.user_row[i]]), log.post[c], log.author[c], log.surface[c],
            log.post[h], log.author[h], log.labels[h], log.surface[h],
            history_signals={k: log.side.raw_signals[k][h] for k in signals},
            candidate_times_ms=log.time[c],
        ))  # fmt: skip
    return out


def _assert_same_side(served: SideBatch, trained: SideBatch) -> None:
    """Bit for bit; training pads every slate to max_candidates, serving to the batch's
    largest slate: the extra padding slots are zeros."""
    c = served.candidate_numeric.shape[1]
    for name in ("user_feature_rows", "user_numeric", "history_signals",
                 "candidate_feature_rows", "candidate_numeric"):  # fmt: skip
        x, y = getattr(served, name), getattr(trained, name)
        if name.startswith("candidate"):
            assert not y[:, c:].any(), name
            y = y[:, :c]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert torch.equal(x, y), name


@pytest.mark.parametrize("data", ["synthetic", "kuairand"])
def test_served_side_features_and_scores_equal_trainings(data, request):
    log = request.getfixturevalue(data)
    log = log["log"] if isinstance(log, dict) else log
    store = log.side.store
    assert store is not None and store.side_config(HashConfigOf(log)) is not None
    req = build_requests(log, log.days(None, None), ExampleConfig(S, C))
    req = req.take(np.arange(0, len(req), max(1, len(req) // 60)))  # ~60 slates, every day
    model, lb = _training_batch(log, req)
    assert (req.history < 0).any() and (req.candidates < 0).any()  # padding on both sides
    # a client sends the signals only it knows; a post's own duration comes from the store
    for signals in (store.request_columns, store.required_columns):
        queries = _queries(log, req, signals)
        served = to_side_batch(queries, model, S, store)
        _assert_same_side(served, lb.side)
        batch = to_batch(queries, model, S)
        with torch.no_grad():
            want = model(lb.batch, side=lb.side)
            got = model(batch, side=served)
        c = batch.candidate_post_hashes.shape[1]
        torch.testing.assert_close(got.logits, want.logits[:, :c], rtol=0, atol=1e-6)
        # and through RequestRanker: the probabilities of the training path
        ranker = RequestRanker(model, history_len=S, side_store=store)
        for q, res, p in zip(queries, ranker.rank(queries), want.probs, strict=True):
            np.testing.assert_allclose(res.probs, p[: q.num_candidates].numpy(), atol=1e-6)
    # the side features do move the scores (the check above could fail)
    blank = SideBatch(*(torch.zeros_like(getattr(lb.side, f)) for f in (
        "user_feature_rows", "user_numeric", "history_signals", "candidate_feature_rows",
        "candidate_numeric")))  # fmt: skip
    with torch.no_grad():
        assert not torch.allclose(model(lb.batch, side=blank).logits, want.logits, atol=1e-4)


def HashConfigOf(log):
    return table_config(log, log.days(None, 20220428), "hybrid", 0.25, 2, dim=8)


def test_unknown_users_and_posts_get_trainings_missing_values(synthetic):
    """A user without a table row, a post without one (no genre, no length, no creation date):
    what training gives such a row. An ID the log never saw reads the same as missing."""
    log, store = synthetic["log"], synthetic["log"].side.store
    cfg = HashConfigOf(log)
    rows = np.flatnonzero((log.user >= 35) & (log.post >= 115))[:3]
    assert len(rows) == 3
    side = side_batch(store, cfg, log.user[rows], np.zeros((3, 1), np.int64), {},
                      log.post[rows][:, None], log.time[rows][:, None])  # fmt: skip
    hashes = RowHashes(log, cfg)
    np.testing.assert_array_equal(side.user_feature_rows.numpy(), hashes.user_features[rows])
    np.testing.assert_array_equal(side.candidate_feature_rows[:, 0].numpy(),
                                  hashes.post_features[rows])  # fmt: skip
    np.testing.assert_array_equal(side.candidate_numeric[:, 0].numpy(), log.side.post_num[rows])
    assert (side.candidate_feature_rows == 0).all()  # no genre, length, age: all missing
    assert (side.user_feature_rows == 0).all()
    never = side_batch(store, cfg, np.array([10**9]), np.zeros((1, 1), np.int64), {},
                       np.array([[10**9]]), np.array([[log.time[0]]]))  # fmt: skip
    assert torch.equal(never.candidate_numeric[0, 0], side.candidate_numeric[0, 0])
    assert torch.equal(never.user_numeric[0], side.user_numeric[0])


def test_requests_missing_what_the_ranker_needs_are_refused(synthetic):
    log = synthetic["log"]
    store = log.side.store
    req = build_requests(log, log.days(20220429, None), ExampleConfig(S, C)).take(np.arange(3))
    model, _ = _training_batch(log, req)
    q = _queries(log, req, ("watch_ms",))[0]
    assert q.history_len > 0
    fields = {f: getattr(q, f) for f in q.__dataclass_fields__}
    no_watch = RankQuery(**{**fields, "history_signals": {}})
    with pytest.raises(ValueError, match="history events need 'watch_ms'"):
        to_side_batch([no_watch], model, S, store)
    no_time = RankQuery(**{**fields, "candidate_times_ms": None})
    with pytest.raises(ValueError, match="candidate_times_ms is missing"):
        to_side_batch([no_time], model, S, store)
    typo = RankQuery(**{**fields, "history_signals": {"watch_s": np.zeros(q.history_len)}})
    with pytest.raises(ValueError, match=r"history_signals names \['watch_s'\]"):
        to_side_batch([typo], model, S, store)
    with pytest.raises(ValueError, match="needs the side store"):
        RequestRanker(model, history_len=S)
    other = load_log(synthetic["log_path"], LogSchema.from_dict(
        {**SIDE_SCHEMA, "user_numeric": []}), authors=synthetic["posts"],
        users=synthetic["users"]).side.store  # fmt: skip
    with pytest.raises(ValueError, match="the side store gives"):
        RequestRanker(model, history_len=S, side_store=other)
