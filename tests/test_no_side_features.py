"""``--no-side-features``: the table gets no ``feature`` block and its bytes go to user, post and
author; a run with side features off (or rate features on) resumes from its own checkpoint."""

import json

import numpy as np
import pytest
from test_side_features import SIDE_SCHEMA, _write_side_log

from hashrec.cli import main
from hashrec.data import LogSchema, load_log
from hashrec.data.tables import ENTITY_WEIGHTS, table_config
from hashrec.training.checkpoint import load_checkpoint

from conftest import cli_error

ENTITIES = ("user", "post", "author")


@pytest.fixture
def side_log(tmp_path):
    log_path, posts, users = _write_side_log(tmp_path)
    return log_path, posts, users


def _blocks(cfg) -> dict[str, int]:
    """Rows of each entity block (hashed rows plus a scheme's extra rows)."""
    return {e.name: e.block_rows for e in cfg.entities}


@pytest.mark.parametrize("scheme", ["multihash", "hybrid"])
def test_without_side_features_the_feature_rows_go_to_user_post_author(side_log, scheme):
    log_path, posts, users = side_log
    log = load_log(str(log_path), LogSchema.from_dict(SIDE_SCHEMA), authors=str(posts),
                   users=str(users))  # fmt: skip
    assert log.side.num_fields  # the log has categorical side values
    every = np.ones(len(log), bool)
    kw = {"weights": ENTITY_WEIGHTS, "dim": 8}
    on = _blocks(table_config(log, every, scheme, 0.8, **kw))
    off = _blocks(table_config(log, every, scheme, 0.8, side_features=False, **kw))
    assert "feature" in on and "feature" not in off  # no feature rows at all
    # the same bytes (within the rounding of one block), all of them on user, post and author
    assert abs(sum(off.values()) - sum(on.values())) <= 2
    assert all(off[e] >= on[e] for e in ENTITIES)
    assert sum(off[e] for e in ENTITIES) >= sum(on.values()) - 2
    assert off["post"] > on["post"]
    # without entity weights every block is its own share of its IDs: nothing to give away
    plain_on = _blocks(table_config(log, every, scheme, 0.8, dim=8))
    plain_off = _blocks(table_config(log, every, scheme, 0.8, dim=8, side_features=False))
    assert plain_off == {e: plain_on[e] for e in ENTITIES}


def _train_argv(side_log, out, *extra):
    log_path, posts, users = side_log
    return ["train", "--data", str(log_path), "--schema", json.dumps(SIDE_SCHEMA), "--authors",
            str(posts), "--users", str(users), "--train-end", "2022-04-28", "--eval-start",
            "2022-04-29", "--dim", "8", "--layers", "1", "--history-len", "4",
            "--max-candidates", "4", "--batch-size", "32", "--epochs", "1", "--seeds", "1",
            "--val-days", "0", "--table-fraction", "0.8", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize("flag", ["--no-side-features", "--rate-features"])
def test_a_run_without_side_features_or_with_rate_features_resumes(side_log, tmp_path, flag):
    """Resuming compares the checkpoint's model with the one this run builds from the log as
    the model sees it (side columns dropped, rate features added), not from the raw log."""
    out = tmp_path / "run"
    assert main(_train_argv(side_log, out, flag)) == 0
    model, _ = load_checkpoint(out / "checkpoint.safetensors")
    names = [e.name for e in model.config.hash.entities]
    assert names == (["user", "post", "author"] if flag == "--no-side-features" else
                     ["user", "post", "author", "feature"])  # fmt: skip
    assert main(_train_argv(side_log, out, flag, "--resume", "--epochs", "2")) == 0
    _, info = load_checkpoint(out / "checkpoint.safetensors")
    assert info.train_state.epoch == 2 and info.train_state.done


def test_evaluate_standardises_side_numbers_as_training_did(side_log, tmp_path, capsys):
    """``hashrec evaluate`` rebuilds the side numbers with the checkpoint's statistics (the
    training days'), not the whole log's, so it scores what training scored."""
    out = tmp_path / "run"
    assert main(_train_argv(side_log, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    name = next(k for k in metrics["results"] if k.startswith("hashed"))
    _, info = load_checkpoint(out / "checkpoint.safetensors")
    assert set(info.extra["side_stats"]) >= {"post_num:length", "user_num:fans"}
    log_path, posts, users = side_log
    rc = main(["evaluate", "--checkpoint", str(out / "checkpoint.safetensors"), "--data",
               str(log_path), "--schema", json.dumps(SIDE_SCHEMA), "--authors", str(posts),
               "--users", str(users), "--eval-start", "2022-04-29", "--out",
               str(tmp_path / "eval.json")])  # fmt: skip
    assert rc == 0
    got = json.loads((tmp_path / "eval.json").read_text())["results"][name]["auc"]
    assert got == pytest.approx(metrics["results"][name]["auc"], abs=1e-6, nan_ok=True)


@pytest.mark.parametrize("flags", [(), ("--no-side-features", "--rate-features")])
def test_a_checkpoint_without_side_stats_is_not_resumed_with_new_features(side_log, tmp_path,
                                                                           capsys, flags):  # fmt: skip
    """A side-feature (or rate-feature) run written before checkpoints recorded their
    standardisation would resume on differently standardised numbers: refused, naming why."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    assert main(_train_argv(side_log, out, *flags)) == 0
    path = out / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    extra = json.loads(meta["extra"])
    del extra["side_stats"]  # as an older version wrote it
    save_file(load_file(str(path)), str(path), metadata={**meta, "extra": json.dumps(extra)})
    capsys.readouterr()
    err = cli_error(_train_argv(side_log, out, *flags, "--resume", "--epochs", "2"), capsys, 1)
    assert "written before side numbers were standardised" in err


def test_broken_side_statistics_are_named(side_log):
    """Statistics handed back (a checkpoint's, or a library user's) are checked: a missing
    number, a zero or infinite scale, an entry that is not two numbers."""
    log_path, posts, users = side_log
    log = load_log(str(log_path), LogSchema.from_dict(SIDE_SCHEMA), authors=str(posts),
                   users=str(users))  # fmt: skip
    good = {k: list(v) for k, v in log.side.stats.items()}
    for bad, match in (([1.0, 0.0], "scale > 0"), ([1.0, float("inf")], "scale > 0"),
                       ([1.0], r"expected \[mean, scale\]"), ("x", r"expected \[mean, scale\]")):  # fmt: skip
        stats = {**good, "post_num:length": bad}
        for target in (log.side, log.side.store):
            with pytest.raises(ValueError, match=f"'post_num:length'.*{match}"):
                target.with_stats(stats)
    assert log.side.store.with_stats(good).stats == log.side.stats
