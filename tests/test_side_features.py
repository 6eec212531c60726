"""Side features, threshold labels, logs without authors, validation / early stopping, action
weights, seeds in the results table, the LightGBM baseline."""

import json

import numpy as np
import pytest
import torch

from hashrec import HashConfig, PhoenixRanker, RankerConfig, TransformerConfig
from hashrec.cli import main
from hashrec.data import ExampleConfig, LogSchema, RowHashes, batches, build_requests, load_log
from hashrec.data.features import categorical_ids
from hashrec.evaluation.experiment import (
    ModelSpec,
    Split,
    collision_free_config,
    collision_free_spec,
    ensemble_probs,
    evaluate_predictions,
    hashed_config,
    ranker_config,
    run_model,
    validation_split,
)
from hashrec.evaluation.report import aggregate_seeds, format_results
from hashrec.models.losses import ranking_loss
from hashrec.models.ranker import RankerOutput
from hashrec.nn.side import SideBatch, SideConfig
from hashrec.training.trainer import TrainConfig

from conftest import cli_error, write_synthetic_log

SIDE_SCHEMA = {
    "user": "uid", "post": "item", "author": "creator", "surface": "tab", "time": "ts",
    "time_unit": "s", "actions": {"click": "clicked", "like": "liked"},
    "post_categorical": ["genre"], "post_numeric": ["length"], "post_time": "created",
    "user_categorical": ["level"], "user_numeric": ["fans"],
    "history_signals": [["watch_ratio", "watch_ms", "length"]],
}  # fmt: skip


def _write_side_log(tmp_path):
    """The synthetic log plus a post table and a user table (with gaps: features optional)."""
    log = tmp_path / "log.csv"
    write_synthetic_log(log)
    lines = log.read_text().splitlines()
    rng = np.random.default_rng(1)
    posts = tmp_path / "posts.csv"
    rows = ["item,creator,genre,length,created"]
    for p in range(1, 121):
        genre = "" if p % 10 == 0 else ["news", "music", "cats"][p % 3]
        rows.append(
            f"{p},{p % 17 + 1},{genre},{int(rng.integers(5000, 90000))},2022-04-{p % 20 + 1:02d}"
        )
    posts.write_text("\n".join(rows) + "\n")
    users = tmp_path / "users.csv"
    users.write_text(
        "uid,level,fans\n"
        + "".join(f"{u},{'high' if u % 2 else 'low'},{u * 7}\n" for u in range(1, 35))
    )  # users 35..40 absent
    log.write_text("\n".join(lines) + "\n")
    return log, posts, users


def test_side_features_from_tables_and_missing_values(tmp_path):
    log_path, posts, users = _write_side_log(tmp_path)
    # the log lacks length and watch ratio's denominator: length comes from the post table
    log = load_log(str(log_path), LogSchema.from_dict(SIDE_SCHEMA), authors=str(posts),
                   users=str(users))  # fmt: skip
    sd = log.side
    assert sd.names["post_cat"] == ("genre", "length#bucket", "post_age_days#bucket")
    assert sd.names["user_cat"] == ("level", "fans#bucket")
    assert sd.names["post_num"] == ("length", "post_age_days")
    assert sd.post_cat.shape == (len(log), 3) and sd.user_num.shape == (len(log), 1)
    # same value -> same ID; a missing value (empty genre, absent user) -> 0
    genre = sd.post_cat[:, 0]
    raw = log.post - 0  # id_offset 0
    assert (genre[raw % 10 == 0] == 0).all() and (genre[raw % 10 != 0] != 0).all()
    cats = raw % 3 == 1
    assert len(np.unique(genre[cats & (raw % 10 != 0)])) == 1
    assert (sd.user_cat[log.user >= 35, 0] == 0).all() and (
        sd.user_cat[log.user < 35, 0] != 0
    ).all()
    assert (sd.user_num[log.user >= 35] == 0).all()
    # the post's age at the impression: impression day minus creation day, never negative
    assert np.isfinite(sd.post_num).all() and np.isfinite(sd.signals).all()
    # categorical IDs depend on the column: the same value in two columns differs
    assert categorical_ids("a", np.array(["x"]))[0] != categorical_ids("b", np.array(["x"]))[0]


def test_side_numbers_are_standardised_by_the_training_rows_only(tmp_path):
    """No evaluation-day value shapes a training feature: the model's log standardises every
    number by the training rows' statistics, and records them for serving."""
    from dataclasses import replace

    from hashrec.evaluation.experiment import model_log

    log_path, posts, users = _write_side_log(tmp_path)
    log = load_log(str(log_path), LogSchema.from_dict(SIDE_SCHEMA), authors=str(posts),
                   users=str(users))  # fmt: skip
    train = log.days(None, 20220428)
    spec = collision_free_spec(log, TransformerConfig(dim=8, num_layers=1, num_q_heads=2,
                                                      num_kv_heads=1))  # fmt: skip
    fitted = model_log(log, spec, train).side
    for kind in ("user_num", "post_num", "signals"):
        x, raw = getattr(fitted, kind)[train], fitted.raw
        for j, name in enumerate(fitted.names[kind]):
            ok = ~np.isnan(raw[f"{kind}:{name}"][train])
            assert abs(x[ok, j].mean()) < 1e-5 and abs(x[ok, j].std() - 1) < 1e-4, name
    assert fitted.stats != log.side.stats  # the whole log's differ
    assert fitted.store.stats == fitted.stats  # what serving standardises with
    # an extreme evaluation-day value moves the whole log's statistics, not training's
    raw = {k: np.where(train, v, v * 50) for k, v in log.side.raw.items()}
    shifted = replace(log, side=replace(log.side, raw=raw))
    again = model_log(shifted, spec, train).side
    np.testing.assert_array_equal(again.post_num[train], fitted.post_num[train])
    np.testing.assert_array_equal(again.signals[train], fitted.signals[train])
    assert shifted.side.fit_stats(np.ones(len(log), bool)).stats != log.side.stats
    # columns standardised when added (rate features) have no raw values: they stay as they are
    from hashrec.evaluation.experiment import with_rate_features

    rated = with_rate_features(log, train).side
    refit = rated.fit_stats(train)
    assert refit.post_num.shape == rated.post_num.shape
    np.testing.assert_array_equal(refit.post_num[:, 2:], rated.post_num[:, 2:])
    with pytest.raises(ValueError, match=r"none for \['post_num:length'\]"):
        log.side.with_stats({k: v for k, v in log.side.stats.items() if k != "post_num:length"})


def test_threshold_labels_and_log_without_authors(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("user,movie,rating,ts\n" + "".join(
        f"{u},{m},{(u * m) % 5 + 1},{1_650_844_800 + 3600 * (u + 7 * m)}\n"
        for u in range(1, 20) for m in range(1, 15)))  # fmt: skip
    schema = LogSchema.from_dict({"user": "user", "post": "movie", "author": None,
                                  "time": "ts", "time_unit": "s",
                                  "actions": {"like": "rating >= 4", "watch": "rating > 0"}})  # fmt: skip
    log = load_log(str(path), schema)
    assert log.actions == ("like", "watch")
    rating = (log.user * log.post) % 5 + 1
    assert (log.labels[:, 0] == (rating >= 4)).all() and log.labels[:, 1].all()
    assert (log.author == 0).all()
    hashes = RowHashes(log, HashConfig.uniform(num_buckets=31))
    assert (hashes.author == 0).all()  # no author tokens: padding rows, zero vectors


@pytest.mark.parametrize("spec", ["rating >>= 4", "rating >= four", ""])
def test_bad_label_rule(spec):
    with pytest.raises(ValueError, match="action 'like'"):
        LogSchema(actions={"like": spec})


def test_non_binary_column_suggests_a_rule(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("user_id,post_id,rating,time_ms\n1,2,5,1000\n")
    with pytest.raises(ValueError, match="rating >= 4"):
        load_log(str(path), LogSchema(author=None, actions={"like": "rating"}))


def _side_model(log, k=2):
    spec = ModelSpec("m", hashed_config(log, 0.5, k),
                     TransformerConfig(dim=8, num_layers=1, num_q_heads=2, num_kv_heads=1))  # fmt: skip
    return PhoenixRanker(ranker_config(log, spec)), spec


def test_ranker_uses_side_features_and_keeps_candidate_isolation(tmp_path):
    log_path, posts, users = _write_side_log(tmp_path)
    log = load_log(str(log_path), LogSchema.from_dict(SIDE_SCHEMA), authors=str(posts),
                   users=str(users))  # fmt: skip
    torch.manual_seed(0)
    model, spec = _side_model(log)
    assert model.config.side == SideConfig(2, 3, 1, 2, 1)
    model.eval()
    req = build_requests(log, log.days(20220428, None), ExampleConfig(6, 4))
    lb = next(batches(log, RowHashes(log, spec.hash_config), req, 8))
    with pytest.raises(ValueError, match="pass side=SideBatch"):
        model(lb.batch)
    base = model(lb.batch, side=lb.side).logits
    # another value of one candidate's side field changes that candidate's score only
    side = SideBatch(**{k: v.clone() for k, v in vars(lb.side).items()})
    row = side.candidate_feature_rows[0, 0, 0]
    side.candidate_feature_rows[0, 0, 0] = torch.where(row == row.max(), row - 1, row + 1)
    side.candidate_numeric[0, 0] += 1.0
    moved = model(lb.batch, side=side).logits
    changed = (moved - base).abs().amax(-1) > 1e-6
    assert changed[0, 0] and changed.sum() == 1
    # a user field reaches every candidate of that request; a history signal too
    side2 = SideBatch(**{k: v.clone() for k, v in vars(lb.side).items()})
    side2.history_signals[1] += 2.0
    moved2 = model(lb.batch, side=side2).logits
    diff = (moved2 - base).abs().amax(-1) > 1e-6
    assert diff[1][lb.batch.candidate_post_hashes[1, :, 0] != 0].all() and not diff[0].any()
    # gradients reach the feature block of the table
    model.train()
    ranking_loss(model(lb.batch, side=lb.side), lb.labels, lb.label_mask).backward()
    lo, hi = spec.hash_config.row_range("feature")
    grad = model.table.weight.grad.coalesce() if model.table.weight.grad.is_sparse else None
    rows = grad.indices()[0] if grad is not None else model.table.weight.grad.abs().sum(1).nonzero()
    assert ((rows >= lo) & (rows <= hi)).any()


def test_side_batch_shape_errors():
    side = SideBatch.empty(2, 3, 4)
    side.validate(SideConfig(), 2, 3, 4)
    with pytest.raises(
        ValueError, match=r"side.user_numeric has shape \[2, 0\], expected \[2, 1\]"
    ):
        side.validate(SideConfig(user_numeric=1), 2, 3, 4)
    with pytest.raises(ValueError, match="feature"):
        RankerConfig(hash=HashConfig.uniform(31), side=SideConfig(post_fields=1))


def test_checkpoint_roundtrip_keeps_side_config(tmp_path):
    from hashrec.training.checkpoint import load_checkpoint, save_checkpoint

    log_path, posts, users = _write_side_log(tmp_path)
    log = load_log(str(log_path), LogSchema.from_dict(SIDE_SCHEMA), authors=str(posts),
                   users=str(users))  # fmt: skip
    model, _ = _side_model(log)
    model.config.dropout = 0.2
    save_checkpoint(tmp_path / "c.safetensors", model)
    loaded, _ = load_checkpoint(tmp_path / "c.safetensors")
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_weighted_table_stays_within_its_share(tmp_path):
    log_path, posts, users = _write_side_log(tmp_path)
    log = load_log(str(log_path), LogSchema.from_dict(SIDE_SCHEMA), authors=str(posts),
                   users=str(users))  # fmt: skip
    full = collision_free_config(log)[0].num_rows
    weights = {"user": 1, "post": 4, "author": 2, "feature": 2}
    for frac in (0.5, 0.8):  # (at 25% the 65 reserved rows alone would fill this tiny table)
        cfg = hashed_config(log, frac, 2, weights=weights)
        assert cfg.num_rows <= frac * full
        per_id = {e.name: e.num_buckets / n for e, n in zip(
            cfg.entities, [len(np.unique(log.user)), len(np.unique(log.post)),
                           len(np.unique(log.author))], strict=False)}  # fmt: skip
        assert per_id["post"] > 2 * per_id["user"]
    with pytest.raises(ValueError, match="weights names"):
        hashed_config(log, 0.25, 2, weights={"video": 1.0})


def test_action_weights_in_the_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 2, generator=g)
    labels = (torch.rand(2, 3, 2, generator=g) < 0.5).float()
    out = RankerOutput(logits, torch.zeros(2, 3, 0), torch.ones(2, 3, dtype=torch.bool))
    only_first = ranking_loss(out, labels, action_weights=torch.tensor([1.0, 0.0]))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[..., 0], labels[..., 0])
    torch.testing.assert_close(only_first, bce / 2)  # normalised by all 12 entries
    torch.testing.assert_close(ranking_loss(out, labels, action_weights=torch.ones(2)),
                               ranking_loss(out, labels))  # fmt: skip
    with pytest.raises(ValueError, match="action_weights has shape"):
        ranking_loss(out, labels, action_weights=torch.ones(3))


def test_validation_split_and_early_stopping(tmp_path):
    log_path, posts, users = _write_side_log(tmp_path)
    log = load_log(str(log_path), LogSchema.from_dict(SIDE_SCHEMA), authors=str(posts),
                   users=str(users))  # fmt: skip
    train = log.days(None, 20220429)
    fit, val = validation_split(log, train, TrainConfig(val_days=1))
    assert set(np.unique(log.day[val])) == {20220429} and not (fit & val).any()
    assert (fit | val).sum() == train.sum()
    fit, val = validation_split(log, train, TrainConfig(val_fraction=0.2))
    assert log.time[fit].max() <= log.time[val].min()
    assert abs(val.sum() / train.sum() - 0.2) < 0.05
    with pytest.raises(ValueError, match="leaves no training day"):
        validation_split(log, train, TrainConfig(val_days=5))
    spec = ModelSpec("m", hashed_config(log, 0.5, 2),
                     TransformerConfig(dim=8, num_layers=1, num_q_heads=2, num_kv_heads=1))  # fmt: skip
    split = Split(train_end=20220429, eval_start=20220430)
    tc = TrainConfig(epochs=6, batch_size=8, lr=3e-2, val_days=1, patience=1)
    r = run_model(log, split, spec, ExampleConfig(6, 4), tc, tmp_path / "run", progress=False)
    st = r.state
    # stopped one epoch after the best (or ran out of epochs); the model holds the best weights
    assert len(st.validation) == st.epoch and 0 <= st.best_epoch < st.epoch
    assert st.epoch == 6 or st.epoch == st.best_epoch + 2
    assert st.validation[st.best_epoch] == max(st.validation)
    from hashrec.training.checkpoint import load_checkpoint

    best, _ = load_checkpoint(tmp_path / "run" / "best.safetensors")
    final, _ = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    for k, v in r.model.state_dict().items():
        torch.testing.assert_close(best.state_dict()[k], v.cpu())
        torch.testing.assert_close(final.state_dict()[k], v.cpu())


def test_table_columns_follow_the_log_and_show_spread():
    runs = {"m": [{"auc": {"a": 0.6, "b": 0.7, "c": 0.5}, "gauc": {"a": 0.6, "b": 0.5, "c": 0.5},
                   "ndcg": {"a": 0.8}, "calibration": {"a": 1.0, "b": 1.0, "c": 1.0}},
                  {"auc": {"a": 0.62, "b": 0.7, "c": 0.5}, "gauc": {"a": 0.6, "b": 0.5, "c": 0.5},
                   "ndcg": {"a": 0.8}, "calibration": {"a": 1.0, "b": 1.0, "c": 1.0}}]}  # fmt: skip
    table = format_results(aggregate_seeds(runs), ("a", "b", "c"), {"a": 500, "b": 100, "c": 99})
    head = table.splitlines()[0]
    assert "AUC a" in head and "AUC b" in head and "AUC c" not in head
    assert "GAUC a" in head and "click" not in head and "long_view" not in head
    assert "| m | 0.610 ± 0.014 | 0.700 ± 0.000 |" in table


def _write_ratings(path, n_users=150, seed=0):
    """Ratings with a per-movie quality (a main effect the baselines can pick up), no authors."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=40)
    lines = []
    for u in range(1, n_users + 1):
        for j in range(12):
            m = int(rng.integers(0, 40))
            r = int(np.clip(np.round(3 + quality[m] + rng.normal()), 1, 5))
            lines.append(f"{u},{m + 1},{r},{1_650_844_800 + 86400 * (j // 2) + 60 * u + j}\n")
    path.write_text("user,movie,rating,ts\n" + "".join(lines))


RATINGS_SCHEMA = {"user": "user", "post": "movie", "author": None, "time": "ts",
                  "time_unit": "s", "actions": {"like": "rating >= 4", "dislike": "rating <= 2"}}  # fmt: skip


def test_gbdt_baseline_learns_from_the_same_features(tmp_path):
    pytest.importorskip("lightgbm")
    from hashrec.evaluation.baselines import GBDTBaseline
    from hashrec.evaluation.metrics import auc

    path = tmp_path / "ratings.csv"
    _write_ratings(path)
    log = load_log(str(path), LogSchema.from_dict(RATINGS_SCHEMA))
    train, ev = log.days(None, 20220428), log.days(20220429, None)
    rows = np.flatnonzero(ev)
    p = GBDTBaseline(num_trees=30, min_child_samples=5).fit(log, train).predict(log, train, rows)
    assert p.shape == (len(rows), 2) and ((p > 0) & (p < 1)).all()
    assert auc(log.labels[rows, 0], p[:, 0]) > 0.65  # a movie's like rate carries over in time


def test_cli_generic_log_with_rule_and_no_author(tmp_path, capsys):
    path = tmp_path / "ratings.csv"
    _write_ratings(path)
    out = tmp_path / "run"
    rc = main(["train", "--data", str(path), "--schema", json.dumps(RATINGS_SCHEMA),
               "--train-end", "2022-04-28", "--eval-start", "2022-04-29", "--dim", "8",
               "--layers", "1", "--history-len", "4", "--max-candidates", "4", "--batch-size",
               "32", "--epochs", "1", "--seeds", "2", "--out", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| model | AUC like | AUC dislike | GAUC like | NDCG@10 like | calib like |" in printed
    assert " ± " in printed and "seeds 0, 1" in printed and "ensemble rows: " in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["positives"]["like"] >= 100 and metrics["positives"]["dislike"] >= 100
    hashed = next(k for k in metrics["results"] if k.startswith("hashed"))
    assert len(metrics["per_seed"][hashed]) == 2 and metrics["results"][hashed]["seeds"] == 2
    assert (out / "seed_1" / "checkpoint.safetensors").exists()
    ens = f"{hashed}, ensemble of 2 seeds"  # the row right after its model's
    names = list(metrics["results"])
    assert names[names.index(hashed) + 1] == ens and metrics["results"][ens]["seeds"] == 1
    assert f"| {ens} | " in printed


def test_ensemble_probs_averages_logits():
    a, b = np.array([[0.9, 0.2], [0.5, 0.01]]), np.array([[0.6, 0.2], [0.5, 0.99]])
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    want = 1 / (1 + np.exp(-(logit(a) + logit(b)) / 2))
    np.testing.assert_allclose(ensemble_probs([a, b]), want, rtol=1e-12)
    np.testing.assert_allclose(ensemble_probs([a, b])[1], [0.5, 0.5], atol=1e-12)  # symmetric
    np.testing.assert_allclose(ensemble_probs([a]), a, rtol=1e-12)
    assert np.isfinite(ensemble_probs([np.array([[0.0, 1.0]])])).all()  # clipped, no inf
    with pytest.raises(ValueError, match="different shapes"):
        ensemble_probs([a, b[:1]])
    with pytest.raises(ValueError, match="at least one"):
        ensemble_probs([])


def test_ensemble_row_scores_the_combined_predictions(tmp_path):
    """The row ``run`` adds per model of several seeds: the metrics of ``ensemble_probs`` of
    exactly that model's seeds, placed after the model; a model of one seed gets none."""
    from hashrec.evaluation.experiment import _with_ensembles

    path = tmp_path / "log.csv"
    write_synthetic_log(path)
    from conftest import SCHEMA_JSON

    log = load_log(str(path), LogSchema.from_dict(json.loads(SCHEMA_JSON)))
    rows = np.arange(200)
    reqs = rows // 5
    rng = np.random.default_rng(0)
    p = [rng.uniform(0.01, 0.99, (200, len(log.actions))) for _ in range(3)]
    runs = {name: [evaluate_predictions(log, rows, reqs, {name: q})[name] for q in qs]
            for name, qs in (("m", p[:2]), ("one", p[2:]))}  # fmt: skip
    out = _with_ensembles(log, rows, reqs, runs, {"m": p[:2], "one": p[2:]})
    assert list(out) == ["m", "m, ensemble of 2 seeds", "one"]
    want = evaluate_predictions(log, rows, reqs, {"e": ensemble_probs(p[:2])})["e"]
    assert out["m, ensemble of 2 seeds"] == [want]
    assert out["m"] is runs["m"]


def test_cli_rejects_unknown_action_weight(tmp_path, capsys):
    path = tmp_path / "log.csv"
    write_synthetic_log(path)
    from conftest import SCHEMA_JSON

    err = cli_error(["train", "--data", str(path), "--schema", SCHEMA_JSON, "--action-weights",
                     "share=2", "--train-end", "2022-04-28", "--eval-start", "2022-04-29",
                     "--out", str(tmp_path / "r")], capsys, 2)  # fmt: skip
    assert "--action-weights names ['share']" in err
    err = cli_error(["train", "--data", str(path), "--schema", SCHEMA_JSON, "--action-weights",
                     "like", "--out", str(tmp_path / "r")], capsys, 2)  # fmt: skip
    assert "name=number" in err


def test_shipped_sample_has_video_and_user_features():
    from hashrec.data import load_kuairand
    from hashrec.datasets import kuairand_sample_dir

    log = load_kuairand(kuairand_sample_dir())
    assert "video_type" in log.side.names["post_cat"] and "tag" in log.side.names["post_cat"]
    assert "user_active_degree" in log.side.names["user_cat"]
    assert (log.side.user_cat[:, 0] != 0).mean() > 0.9
    assert log.side.names["signals"] == ("play_ratio", "play_time")
    plain = load_kuairand(kuairand_sample_dir(), side_features=False)
    assert not plain.side.any and (plain.labels == log.labels).all()


def test_rate_features_never_see_their_own_or_evaluation_labels(tmp_path):
    from hashrec.evaluation.experiment import with_rate_features

    path = tmp_path / "ratings.csv"
    _write_ratings(path)
    log = load_log(str(path), LogSchema.from_dict(RATINGS_SCHEMA))
    train = log.days(None, 20220428)
    base = with_rate_features(log, train)
    assert base.side.post_num.shape[1] == 4 and base.side.user_num.shape[1] == 2
    flipped = log.take(np.arange(len(log)))
    flipped.labels = log.labels.copy()
    day = 20220427
    changed = ~train | (log.day == day)  # evaluation rows and one training day
    flipped.labels[changed] = 1 - flipped.labels[changed]
    after = with_rate_features(flipped, train)
    same = log.day <= day  # rows up to that day are encoded from earlier days only
    # standardisation is over the training rows, whose later rates the flip moves (an affine
    # map per column): compare the order of the rows
    for a in range(4):
        r0 = np.argsort(np.argsort(base.side.post_num[same, a], kind="stable"), kind="stable")
        r1 = np.argsort(np.argsort(after.side.post_num[same, a], kind="stable"), kind="stable")
        np.testing.assert_array_equal(r0, r1)
    later = log.day > day
    assert not np.allclose(after.side.post_num[later], base.side.post_num[later])


def test_cli_rate_features_train_then_evaluate(tmp_path, capsys):
    path = tmp_path / "ratings.csv"
    _write_ratings(path)
    out = tmp_path / "run"
    common = ["--data", str(path), "--schema", json.dumps(RATINGS_SCHEMA), "--eval-start",
              "2022-04-29"]  # fmt: skip
    rc = main(["train", *common, "--train-end", "2022-04-28", "--dim", "8", "--layers", "1",
               "--history-len", "4", "--max-candidates", "4", "--batch-size", "32", "--epochs",
               "2", "--seeds", "1", "--rate-features", "--out", str(out)])  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    hashed = next(k for k in metrics["results"] if k.startswith("hashed"))
    capsys.readouterr()
    rc = main(["evaluate", "--checkpoint", str(out / "checkpoint.safetensors"), *common,
               "--out", str(tmp_path / "eval.json")])  # fmt: skip
    assert rc == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["results"][hashed]["auc"] == pytest.approx(metrics["results"][hashed]["auc"])
