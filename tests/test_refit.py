"""``TrainConfig.refit`` / ``hashrec train --refit``: validation chooses the epoch count, then a
fresh model trains that many epochs on every training row and is the one evaluated."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_no_side_features import _train_argv
from test_side_features import SIDE_SCHEMA, _write_side_log

from hashrec.cli import main
from hashrec.data import ExampleConfig, LogSchema, build_requests, load_log
from hashrec.data.collate import RowHashes
from hashrec.evaluation.experiment import (
    REFIT_DIR,
    Split,
    collision_free_spec,
    run_model,
    validation_split,
)
from hashrec.nn.transformer import TransformerConfig
from hashrec.training.checkpoint import load_checkpoint, read_checkpoint_metadata
from hashrec.training.trainer import TrainConfig, Trainer, predict

from conftest import cli_error


@pytest.fixture
def side_log(tmp_path):
    log_path, posts, users = _write_side_log(tmp_path)
    return log_path, posts, users


def test_refit_needs_a_validation_split():
    with pytest.raises(ValueError, match="refit needs a validation split"):
        TrainConfig(refit=True)
    TrainConfig(refit=True, val_days=1)
    TrainConfig(refit=True, val_fraction=0.2)


def test_refit_trains_the_chosen_epochs_on_every_training_row(side_log, tmp_path):
    log_path, posts, users = side_log
    log = load_log(str(log_path), LogSchema.from_dict(SIDE_SCHEMA), authors=str(posts),
                   users=str(users))  # fmt: skip
    split = Split(train_end=20220428, eval_start=20220429)
    spec = collision_free_spec(
        log, TransformerConfig(dim=8, num_layers=1, num_q_heads=2, num_kv_heads=1)
    )
    cfg = TrainConfig(epochs=3, batch_size=16, val_days=1, patience=3, refit=True)
    examples = ExampleConfig(4, 4)
    run = run_model(log, split, spec, examples, cfg, tmp_path / "run", progress=False)
    chosen = run.state.best_epoch + 1
    assert len(run.state.validation) == 3 and 1 <= chosen <= 3
    # the refit model: its own folder, the chosen epochs, no validation, every training row
    path = tmp_path / "run" / REFIT_DIR / "checkpoint.safetensors"
    meta = read_checkpoint_metadata(path)
    assert meta["extra"]["train"]["epochs"] == chosen
    assert meta["extra"]["train"]["val_days"] == 0 and not meta["extra"]["train"]["refit"]
    assert meta["extra"]["refit"] == {"epochs": chosen, "validation": run.state.validation}
    assert meta["train_state"]["epoch"] == chosen and meta["train_state"]["done"]
    train = split.masks(log)[0]
    fit, _ = validation_split(log, train, cfg)

    def n_examples(rows):
        return int((build_requests(log, rows, examples).candidates >= 0).sum())

    assert run.train_examples == n_examples(train) > n_examples(fit)
    selected = read_checkpoint_metadata(tmp_path / "run" / "checkpoint.safetensors")
    assert selected["extra"]["train"]["refit"] and selected["extra"]["train"]["val_days"] == 1
    # what was evaluated is the refit checkpoint, not the validated run (on the log as the
    # model saw it: numbers standardised by the training rows' statistics, as recorded)
    log = replace(log, side=log.side.fit_stats(train))
    assert meta["extra"]["side_stats"] == {k: list(v) for k, v in log.side.stats.items()}
    model, _ = load_checkpoint(path)
    model.eval()
    hashes = RowHashes(log, spec.hash_config, spec.vocab)
    req = build_requests(log, split.masks(log)[1], examples)
    again = predict(model, log, hashes, req)
    np.testing.assert_allclose(again.probs, run.predictions.probs, atol=1e-6)
    validated, _ = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert not all(
        torch.equal(a, b) for a, b in zip(validated.state_dict().values(),
                                          model.state_dict().values(), strict=True)
    )  # fmt: skip
    # resuming the finished runs takes no training step and gives the same predictions
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "step_loss", lambda *a, **k: pytest.fail("a step was taken"))
        again = run_model(log, split, spec, examples, cfg, tmp_path / "run", resume=True,
                          progress=False)  # fmt: skip
    np.testing.assert_allclose(again.predictions.probs, run.predictions.probs, atol=1e-6)
    # no validation score to choose from (stopped before the first epoch ended): refused
    stopped = TrainConfig(epochs=3, batch_size=16, val_days=1, refit=True, max_steps=1)
    with pytest.raises(ValueError, match="refit: the validation rows gave no score"):
        run_model(log, split, spec, examples, stopped, tmp_path / "stopped", progress=False)


def test_train_refit_cli(side_log, tmp_path, capsys):
    msg = cli_error(_train_argv(side_log, tmp_path / "x", "--refit"), capsys, 2)
    assert "--refit needs a validation split" in msg
    msg = cli_error(_train_argv(side_log, tmp_path / "x", "--refit", "--val-days", "1",
                                "--nproc", "2"), capsys, 2)  # fmt: skip
    assert "--refit needs the validation split, which runs in one process only" in msg
    out = tmp_path / "run"
    argv = _train_argv(side_log, out, "--refit", "--val-days", "1", "--epochs", "2")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{out}/{REFIT_DIR}/checkpoint.safetensors" in printed
    _, info = load_checkpoint(out / REFIT_DIR / "checkpoint.safetensors")
    assert info.extra["refit"]["epochs"] == info.train_state.epoch
    # --refit may be added when resuming a run trained without it
    plain = tmp_path / "plain"
    assert main(_train_argv(side_log, plain, "--val-days", "1", "--epochs", "2")) == 0
    assert not (plain / REFIT_DIR).exists()
    assert main(_train_argv(side_log, plain, "--val-days", "1", "--epochs", "2", "--refit",
                            "--resume")) == 0  # fmt: skip
    assert (plain / REFIT_DIR / "checkpoint.safetensors").exists()
