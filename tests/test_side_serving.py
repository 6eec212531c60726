"""Serving a ranker trained with side features: the side features a served request gets are the
ones training built for the same rows (user and post tables by ID, the post's age at the
impression, the history events' signals, training's standardisation), through the library
(``side_batch``, ``RequestRanker``, ``RecommendPipeline``), ``hashrec recommend`` and the HTTP
service."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from hashrec.cli import main
from hashrec.data import ExampleConfig, LogSchema, RowHashes, batches, build_requests, load_log
from hashrec.data.side_store import side_batch
from hashrec.data.tables import table_config
from hashrec.evaluation.experiment import ModelSpec, ranker_config
from hashrec.models.ranker import PhoenixRanker
from hashrec.nn.side import SideBatch
from hashrec.nn.transformer import TransformerConfig
from hashrec.serving.rank import RankQuery, RequestRanker, to_batch, to_side_batch
from hashrec.training.checkpoint import read_checkpoint_metadata

from conftest import cli_error, write_synthetic_log

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
def inlog(tmp_path_factory):
    """The side columns in the log rows themselves (no tables; the creation time in epoch
    seconds, as the log's time): the store keeps each ID's latest value."""
    path = tmp_path_factory.mktemp("side_inlog") / "log.csv"
    write_synthetic_log(path)
    lines = path.read_text().splitlines()
    rows = [lines[0] + ",genre,length,created,level,fans"]
    for line in lines[1:]:
        uid, item = (int(x) for x in line.split(",")[:2])
        rows.append(f"{line},{['a', 'b', ''][item % 3]},{item * 1000},{1650000000 + item * 3600},"
                    f"{'x' if uid % 2 else ''},{uid * 3}")  # fmt: skip
    path.write_text("\n".join(rows) + "\n")
    return load_log(str(path), LogSchema.from_dict(SIDE_SCHEMA))


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


@pytest.mark.parametrize("data", ["synthetic", "inlog", "kuairand"])
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


# -- hashrec recommend and hashrec serve on a ranker trained with side features ----------------

SPLIT = ["--train-end", "2022-04-28", "--eval-start", "2022-04-29"]
ARCH = ["--dim", "8", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--history-len", "6"]


@pytest.fixture(scope="module")
def trained(synthetic):
    """A ranker (side features on, the CLI defaults otherwise) and a retriever trained through
    the CLI on the synthetic log with its post and user tables."""
    root = synthetic["root"]
    data = ["--data", synthetic["log_path"], "--schema", json.dumps(SIDE_SCHEMA),
            "--authors", synthetic["posts"], "--users", synthetic["users"]]  # fmt: skip
    assert main(["train", *data, *SPLIT, *ARCH, "--max-candidates", "4", "--batch-size", "16",
                 "--epochs", "1", "--seeds", "1", "--out", str(root / "ranker")]) == 0  # fmt: skip
    assert main(["train-retrieval", *data, *SPLIT, *ARCH, "--batch-size", "16", "--epochs", "1",
                 "--out", str(root / "retriever")]) == 0  # fmt: skip
    # as training saw it: numbers standardised by the training days' statistics
    stats = read_checkpoint_metadata(root / "ranker" / "checkpoint.safetensors")["extra"]
    log = synthetic["log"]
    return {
        **synthetic,
        "log": replace(log, side=log.side.with_stats(stats["side_stats"])),
        "data": data,
        "ranker": str(root / "ranker" / "checkpoint.safetensors"),
        "retriever": str(root / "retriever" / "checkpoint.safetensors"),
    }


def _pipeline(trained, **kw):
    from hashrec.retrieval import Corpus
    from hashrec.serving.pipeline import RecommendPipeline
    from hashrec.training.checkpoint import load_checkpoint

    ranker, _ = load_checkpoint(trained["ranker"])
    retriever, _ = load_checkpoint(trained["retriever"])
    log = trained["log"]
    return RecommendPipeline(retriever, ranker, Corpus.from_log(log), history_len=6,
                             side_store=log.side.store, **kw)  # fmt: skip


def test_recommend_cli_serves_a_side_feature_ranker(trained, capsys):
    """retrieve -> rank (with side features) -> score, end to end; the list is the library
    pipeline's on the same log, at the log's last impression time."""
    from hashrec.serving.pipeline import UserRequest
    from hashrec.training.checkpoint import load_checkpoint

    ranker, _ = load_checkpoint(trained["ranker"])
    assert ranker.config.side.any and ranker.config.side.history_signals == 2
    argv = ["recommend", "--retriever", trained["retriever"], "--ranker", trained["ranker"],
            *trained["data"], "--user", "3,36", "--k", "5", "--json"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    log = trained["log"]
    pipe = _pipeline(trained)
    for r in res:
        req = UserRequest.from_log(log, r["user_id"], 6)
        req.time_ms = int(log.time.max())
        want = pipe.recommend(req, 5)
        assert [i["post_id"] for i in r["items"]] == [w.post_id for w in want.items]
        np.testing.assert_allclose([i["score"] for i in r["items"]],
                                   [w.score for w in want.items], rtol=1e-6)  # fmt: skip
    # the post's age counts: a later request time moves the probabilities
    later = UserRequest.from_log(log, 3, 6)
    later.time_ms = int(log.time.max()) + 30 * 86_400_000
    early = UserRequest.from_log(log, 3, 6)
    early.time_ms = int(log.time.max())
    cand = np.arange(10)[None]
    assert not np.allclose(pipe.rank([later], cand)[0], pipe.rank([early], cand)[0])
    # --time-ms: histories end before it
    assert main([*argv[:-5], "--user", "3", "--k", "5", "--json",
                 "--time-ms", str(int(log.time.min()) + 86_400_000)]) == 0  # fmt: skip
    assert len(json.loads(capsys.readouterr().out)[0]["items"]) == 5


def test_recommend_cli_refuses_a_side_ranker_without_its_tables(trained, capsys):
    base = ["recommend", "--retriever", trained["retriever"], "--ranker", trained["ranker"],
            "--data", trained["log_path"], "--user", "3"]  # fmt: skip
    plain = {k: v for k, v in SIDE_SCHEMA.items() if k not in (
        "post_categorical", "post_numeric", "post_time", "user_categorical", "user_numeric",
        "history_signals")}  # fmt: skip
    err = cli_error([*base, "--schema", json.dumps(plain), "--authors", trained["posts"]],
                    capsys, 1)  # fmt: skip
    assert "was trained with side features, but --data holds none" in err
    fewer = {**SIDE_SCHEMA, "user_numeric": []}
    err = cli_error([*base, "--schema", json.dumps(fewer), "--authors", trained["posts"],
                     "--users", trained["users"]], capsys, 1)  # fmt: skip
    assert "the side store gives" in err and "the ranker takes" in err


def _served(app):
    """``app`` behind a real HTTP server on 127.0.0.1, as tests/test_serve.py runs them."""
    from test_serve import Server

    return Server(app)


@pytest.fixture
def app(trained):
    pytest.importorskip("fastapi")
    from hashrec.cli import serve
    from hashrec.cli.dispatch import build_parser

    args = build_parser().parse_args(["serve", "--ranker", trained["ranker"], "--retriever",
                                      trained["retriever"], *trained["data"]])  # fmt: skip
    return serve.build(args)


def _rank_request(log, rows_h, rows_c, time_ms, signals=("watch_ms",)) -> dict:
    return {
        "user_id": int(log.user[rows_c[0]]),
        "time_ms": int(time_ms),
        "history": [{"post_id": int(log.post[h]), "author_id": int(log.author[h]),
                     "actions": [a for a, y in zip(log.actions, log.labels[h], strict=True) if y],
                     "surface": int(log.surface[h]),
                     "signals": {c: float(log.side.raw_signals[c][h]) for c in signals}}
                    for h in rows_h],
        "candidates": [{"post_id": int(log.post[c]), "author_id": int(log.author[c]),
                        "surface": int(log.surface[c]), "time_ms": int(log.time[c])}
                       for c in rows_c],
    }  # fmt: skip


def test_http_rank_serves_side_features_as_training_computes_them(trained, app):
    """POST /rank on slates cut from the log: the training path's probabilities."""
    from hashrec.training.checkpoint import load_checkpoint

    log = trained["log"]
    model, _ = load_checkpoint(trained["ranker"])
    req = build_requests(log, log.days(20220429, None), ExampleConfig(6, 4))
    req = req.take(np.arange(0, len(req), max(1, len(req) // 8)))
    lb = next(batches(log, RowHashes(log, model.config.hash), req, batch_size=len(req)))
    with torch.no_grad():
        want = model(lb.batch, side=lb.side).probs.numpy()
    with _served(app) as client:
        health = client.get("/healthz").json()
        assert health["side_features"] == {"history_signals_required": ["watch_ms"],
                                           "history_signals_optional": [],
                                           "time_ms_required": True}  # fmt: skip
        for i in range(len(req)):
            h = req.history[i][req.history[i] >= 0]
            c = req.candidates[i][req.candidates[i] >= 0]
            r = client.post("/rank", json=_rank_request(log, h, c, log.time[c[0]]))
            assert r.status_code == 200, r.text
            got = [[x["probabilities"][a] for a in log.actions] for x in r.json()["candidates"]]
            np.testing.assert_allclose(got, want[i, : len(c)], atol=1e-6)
        # /recommend: the pipeline with the same store
        from hashrec.serving.pipeline import UserRequest

        user = int(log.user[0])
        hist = np.flatnonzero(log.user == user)[-3:]
        body = _rank_request(log, hist, hist, log.time.max())
        rec = {"user_id": user, "time_ms": body["time_ms"], "history": body["history"], "k": 5}
        r = client.post("/recommend", json=rec)
        assert r.status_code == 200, r.text
        ur = UserRequest(user, tuple(log.actions), log.post[hist], log.author[hist],
                         log.labels[hist].astype(np.float32), log.surface[hist],
                         seen_post_ids=log.post[hist],
                         history_signals={"watch_ms": log.side.raw_signals["watch_ms"][hist]},
                         time_ms=int(log.time.max()))  # fmt: skip
        pipe = _pipeline(trained, retrieve_k=100)
        want_items = pipe.recommend(ur, 5).items
        assert [i["post_id"] for i in r.json()["items"]] == [w.post_id for w in want_items]


def test_http_requests_missing_side_fields_get_422_naming_them(trained, app):
    log = trained["log"]
    rows = np.flatnonzero(log.user == int(log.user[0]))[:4]
    good = _rank_request(log, rows[:2], rows[2:], log.time[rows[2]])
    # every candidate with its own time: the request's may be left out, same scores
    own_times = {k: v for k, v in good.items() if k != "time_ms"}
    no_time = json.loads(json.dumps(own_times))
    del no_time["candidates"][1]["time_ms"]  # one candidate without: the request needs one
    no_signal = json.loads(json.dumps(good))
    del no_signal["history"][0]["signals"]
    nan = json.dumps(good).replace('"watch_ms": ', '"watch_ms": NaN, "x": ', 1)
    unknown = json.loads(json.dumps(good))
    unknown["history"][0]["signals"]["watch_s"] = 1.0
    with _served(app) as client:
        r = client.post("/rank", json=good)
        assert r.status_code == 200
        same = client.post("/rank", json=own_times)
        assert same.status_code == 200 and same.json() == r.json(), same.text
        same = client.post("/rank", json={**own_times, "time_ms": None})  # null: as absent
        assert same.status_code == 200 and same.json() == r.json(), same.text
        r = client.post("/rank", json={**no_time, "time_ms": None})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "time_ms"]
        for body, where in ((no_time, ["body", "time_ms"]),
                            (no_signal, ["body", "history", "0", "signals"])):  # fmt: skip
            r = client.post("/rank", json=body)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == where, r.text
        r = client.post("/rank", content=nan, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        r = client.post("/rank", json=unknown)
        assert r.status_code == 422 and "watch_s" in r.text, r.text
        r = client.post("/recommend", json={"user_id": 3, "k": 2})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "time_ms"]
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert schema["HistorySignals"]["required"] == ["watch_ms"]
        timed = {"required": ["time_ms"], "properties": {"time_ms": {"type": "integer"}}}
        assert schema["RankRequest"]["anyOf"] == [
            timed, {"properties": {"candidates": {"items": timed}}}]  # fmt: skip
        assert "time_ms" in schema["RecommendRequest"]["required"]


def test_serve_cli_needs_data_for_a_side_ranker(trained, capsys):
    err = cli_error(["serve", "--ranker", trained["ranker"]], capsys, 2)
    assert "was trained with side features: give --data" in err
    # without --retriever, --data is the side features' store only: /rank, no /recommend
    from hashrec.cli import serve
    from hashrec.cli.dispatch import build_parser

    pytest.importorskip("fastapi")
    args = build_parser().parse_args(["serve", "--ranker", trained["ranker"], *trained["data"]])
    with _served(serve.build(args)) as client:
        assert client.get("/healthz").json()["side_features"]["time_ms_required"]
        assert client.post("/recommend", json={"user_id": 1}).status_code == 404


def test_rank_cli_refuses_a_side_ranker_with_a_pointer_to_serve(trained, tmp_path, capsys):
    """X's request format carries no side tables: ``hashrec rank`` says where it is served."""
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"user_id": 3, "history": [],
                                   "candidates": [{"post_id": 5, "author_id": 6}]}))  # fmt: skip
    err = cli_error(["rank", "--checkpoint", trained["ranker"], "--request", str(request)],
                    capsys, 1)  # fmt: skip
    assert "trained with side features" in err and "hashrec serve" in err


def test_readme_side_example_is_valid_for_a_kuairand_ranker(kuairand):
    """The README's request for a side-feature ranker, against a ranker built for the KuaiRand
    sample (its default side features): 200, and 422 without the play time."""
    pytest.importorskip("fastapi")
    from pathlib import Path

    from hashrec.serving.app import create_app

    model, _ = _training_batch(kuairand, build_requests(
        kuairand, kuairand.days(20220505, None), ExampleConfig(S, C)).take(np.arange(2)))  # fmt: skip
    app = create_app(RequestRanker(model, history_len=S, side_store=kuairand.side.store))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("<!-- serve-side-example -->")
    body = json.loads(readme[start:].split("```json\n", 1)[1].split("```", 1)[0])
    with _served(app) as client:
        assert client.get("/healthz").json()["side_features"] == {
            "history_signals_required": ["play_time_ms"],
            "history_signals_optional": ["duration_ms"], "time_ms_required": True}  # fmt: skip
        r = client.post("/rank", json=body)
        assert r.status_code == 200, r.text
        del body["history"][0]["signals"]["play_time_ms"]
        r = client.post("/rank", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "history", "0", "signals", "play_time_ms"]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_side_feature_service_never_5xx(trained, mode):
    """schemathesis from /openapi.json of a side-feature service (signals, time_ms): every
    valid request is served, every invalid one gets a 4xx."""
    schemathesis = pytest.importorskip("schemathesis")
    pytest.importorskip("uvicorn")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from test_serve import Server, _integral_floats_to_int

    from hashrec.cli import serve
    from hashrec.cli.dispatch import build_parser

    args = build_parser().parse_args(["serve", "--ranker", trained["ranker"], "--retriever",
                                      trained["retriever"], *trained["data"], "--max-history",
                                      "6", "--max-candidates", "30"])  # fmt: skip
    srv = Server(serve.build(args))
    calls = []
    with srv:
        schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
        for op in [r.ok() for r in schema.get_all_operations()]:
            if op.method.upper() != "POST":
                continue

            @given(case=op.as_strategy(GenerationMode(mode)))
            @settings(max_examples=30, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            def call(case):
                if mode == "positive":
                    case.body = _integral_floats_to_int(case.body)
                r = case.call(base_url=srv.url, timeout=30)
                calls.append((case.path, r.status_code))
                assert r.status_code < 500, (case.path, case.body, r.text[:300])

            call()
    assert {p for p, _ in calls} == {"/rank", "/recommend"}
    statuses = {s for _, s in calls}
    assert statuses == {200} if mode == "positive" else all(400 <= s < 500 for s in statuses)


def test_recommend_cli_notices_a_log_other_than_the_training_log(trained, tmp_path, capsys):
    """Another log's side tables and standardisation are used as they are, with a notice."""
    lines = open(trained["log_path"]).read().splitlines()
    other = tmp_path / "other.csv"
    other.write_text("\n".join(lines[:1] + lines[10:]) + "\n")  # a few training rows fewer
    data = [other if x == trained["log_path"] else x for x in trained["data"]]
    argv = ["recommend", "--retriever", trained["retriever"], "--ranker", trained["ranker"],
            *map(str, data), "--user", "3", "--k", "2", "--json"]  # fmt: skip
    assert main(argv) == 0
    assert "is not the log --ranker" in capsys.readouterr().err
    argv[argv.index(str(other))] = trained["log_path"]
    assert main(argv) == 0
    assert "notice" not in capsys.readouterr().err


def test_a_post_time_in_the_log_rows_with_a_post_table_without_it(tmp_path):
    """The post-time column is read from the file that holds it (here the log rows, while the
    post table gives the other post fields): epoch seconds become ms, no KeyError."""
    path = tmp_path / "log.csv"
    write_synthetic_log(path)
    lines = path.read_text().splitlines()
    rows = [lines[0] + ",created"]
    for line in lines[1:]:
        rows.append(f"{line},{1_650_000_000 + int(line.split(',')[1]) * 3600}")
    path.write_text("\n".join(rows) + "\n")
    posts = tmp_path / "posts.csv"
    posts.write_text("item,creator,genre,length\n"
                     + "".join(f"{p},{p % 17 + 1},g{p % 3},{p * 1000}\n" for p in range(1, 121)))  # fmt: skip
    log = load_log(str(path), LogSchema.from_dict(SIDE_SCHEMA), authors=str(posts))
    assert "post_age_days" in log.side.names["post_num"]


def test_the_store_keeps_the_latest_real_value():
    """A later row missing the value (NaN, categorical 0) does not hide an earlier real one; an
    ID with no value at all stays unknown (looked up as missing)."""
    from hashrec.data.side_store import Keyed

    ids, time = np.array([5, 5, 7, 7, 9]), np.array([0, 9, 1, 2, 4])
    num = Keyed.latest(ids, np.array([1.5, np.nan, 2.0, 3.0, np.nan]), time)
    assert num.lookup(np.array([5, 7, 9])).tolist()[:2] == [1.5, 3.0]
    assert np.isnan(num.lookup(np.array([9]))[0])
    cat = Keyed.latest(ids, np.array([11, 0, 12, 0, 0]), time)
    assert cat.lookup(np.array([5, 7, 9])).tolist() == [11, 12, 0]
    empty = Keyed.latest(ids, np.zeros(5, np.int64), time)
    assert empty.lookup(np.array([5])).tolist() == [0]


@pytest.mark.parametrize("side", [True, False])
def test_a_rate_feature_ranker_is_served_the_rates_training_computed(synthetic, trained,
                                                                      tmp_path, side):  # fmt: skip
    """``--rate-features``: serving looks each user's, post's and author's smoothed rates over
    the training days up by ID (``RateTables``); a request on an evaluation day gets the side
    batch training built for it, bit for bit, and the same scores -- with side features and
    without (a store of rates only)."""
    from hashrec.data import SideColumns
    from hashrec.evaluation.experiment import Split, with_rate_features
    from hashrec.retrieval import Corpus
    from hashrec.serving.pipeline import RecommendPipeline, UserRequest
    from hashrec.serving.store import checkpoint_side_store
    from hashrec.training.checkpoint import load_checkpoint

    data = ["--data", synthetic["log_path"], "--schema", json.dumps(SIDE_SCHEMA),
            "--authors", synthetic["posts"], "--users", synthetic["users"]]  # fmt: skip
    flags = ["--rate-features"] + ([] if side else ["--no-side-features"])
    assert main(["train", *data, *SPLIT, *ARCH, "--max-candidates", str(C), "--batch-size", "16",
                 "--epochs", "1", "--seeds", "1", *flags, "--out", str(tmp_path)]) == 0  # fmt: skip
    model, info = load_checkpoint(tmp_path / "checkpoint.safetensors")
    model.eval()
    log = synthetic["log"]
    store = checkpoint_side_store(model, info, log)
    assert store.rates is not None and len(store.rates.tables["author"].keys) > 1
    # malformed records in the checkpoint: one clear error each, never a traceback
    edited = replace(info, extra={**info.extra, "split": {"train_end": "x"}})
    with pytest.raises(ValueError, match="recorded training split"):
        checkpoint_side_store(model, edited, log)
    if side:  # (a model of rates alone computes them from the split, without side_stats)
        edited = replace(info, extra={**info.extra, "side_stats": ["post_num:length"]})
        with pytest.raises(ValueError, match="expected a mapping"):
            checkpoint_side_store(model, edited, log)
        k = next(iter(info.extra["side_stats"]))
        edited = replace(info, extra={**info.extra,
                                      "side_stats": {**info.extra["side_stats"], k: "12"}})  # fmt: skip
        with pytest.raises(ValueError, match=r"expected \[mean, scale\], got '12'"):
            checkpoint_side_store(model, edited, log)
    # the log as training saw it
    train = Split(**info.extra["split"]).masks(log)[0]
    seen = replace(log, side=log.side.with_stats(info.extra["side_stats"]) if side
                   else SideColumns.empty(len(log)))  # fmt: skip
    seen = with_rate_features(seen, train)
    assert seen.side.names["post_num"][-1] == "author_rate:like"
    req = build_requests(seen, ~train, ExampleConfig(S, C))
    lb = next(batches(seen, RowHashes(seen, model.config.hash), req, batch_size=len(req)))
    queries = _queries(seen, req, store.request_columns)
    served = to_side_batch(queries, model, S, store)
    _assert_same_side(served, lb.side)
    with torch.no_grad():
        want = model(lb.batch, side=lb.side).probs
    ranker = RequestRanker(model, history_len=S, side_store=store)
    for q, res, p in zip(queries, ranker.rank(queries), want, strict=True):
        np.testing.assert_allclose(res.probs, p[: q.num_candidates].numpy(), atol=1e-6)
    # the rates are what moves them: an unseen author reads the prior's rates
    rates = store.rates.lookup("author", np.array([10**9, int(log.author[0])]))
    assert not np.array_equal(rates[0], rates[1])
    np.testing.assert_array_equal(rates[0], store.rates.unseen["author"])
    with pytest.raises(ValueError, match="need author_ids of shape"):
        store.post_features(log.post[:2], log.time[:2])
    # the pipeline passes each candidate's author: its rates are the corpus author's
    corpus = Corpus.from_log(log)
    retriever, _ = load_checkpoint(trained["retriever"])
    pipe = RecommendPipeline(retriever, model, corpus, history_len=S, side_store=store)
    h = np.flatnonzero(log.user == int(log.user[0]))[-3:]
    req = UserRequest(int(log.user[0]), tuple(log.actions), log.post[h], log.author[h],
                      log.labels[h].astype(np.float32), log.surface[h],
                      history_signals={c: log.side.raw_signals[c][h] for c in store.request_columns},
                      time_ms=int(log.time.max()))  # fmt: skip
    cand = np.array([[0, 1, 2, -1]])
    side = pipe._side_batch([req], cand)
    A = len(log.actions)
    want = store.rates.lookup("author", corpus.author_ids[:3])
    np.testing.assert_array_equal(side.candidate_numeric[0, :3, -A:].numpy(), want)
    assert not side.candidate_numeric[0, 3].any()  # padding
