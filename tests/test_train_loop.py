"""The epoch loop both trainers share (``hashrec.training.loop``), seen through the two-tower
trainer and ``hashrec train-retrieval``: exact resume, the non-finite stop, the run-folder lock
and the strict resume check, with ``hashrec train``'s messages and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hashrec import HashConfig, PhoenixRanker, RankerConfig, TransformerConfig
from hashrec.cli import main
from hashrec.data import ExampleConfig, LogSchema, RowHashes, build_requests, load_log
from hashrec.models.two_tower import TwoTowerConfig, TwoTowerRetriever
from hashrec.training import checkpoint as ckpt
from hashrec.training.loop import NonFiniteError
from hashrec.training.retrieval import (
    PostLogQ,
    RetrievalTrainConfig,
    RetrievalTrainer,
    positive_rows,
    retrieval_requests,
)
from hashrec.training.runlock import LOCK_NAME
from hashrec.training.trainer import TrainConfig, Trainer

from conftest import SCHEMA_JSON, cli_error

TF = TransformerConfig(dim=8, num_layers=1, num_q_heads=2, num_kv_heads=1)


def _log(log_file):
    return load_log(str(log_file), LogSchema.from_dict(json.loads(SCHEMA_JSON)))


def _retrieval(log, run_dir, **train):
    """A tiny two-tower trainer (weights from seed 0) and what its ``fit`` takes."""
    torch.manual_seed(0)
    cfg = TwoTowerConfig(hash=HashConfig.uniform(num_buckets=31), transformer=TF,
                         actions=log.actions)  # fmt: skip
    pos = positive_rows(log, log.days(None, 20220428), ("click",))
    tc = RetrievalTrainConfig(epochs=2, batch_size=16, positive_actions=("click",),
                              checkpoint_every=3, **train)  # fmt: skip
    trainer = RetrievalTrainer(TwoTowerRetriever(cfg), tc, run_dir, progress=False)
    data = (log, RowHashes(log, cfg.hash), retrieval_requests(log, pos, 6),
            PostLogQ.fit(log.post[pos]))  # fmt: skip
    return trainer, data


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_two_tower_resumed_mid_epoch_equals_the_uninterrupted_run(log_file, tmp_path):
    log = _log(log_file)
    straight, data = _retrieval(log, tmp_path / "a")
    straight.fit(*data)
    total = straight.state.global_step
    assert total > 8 and straight.state.done
    first, _ = _retrieval(log, tmp_path / "b", max_steps=5)  # killed after 5 steps, mid-epoch 1
    first.fit(*data)
    assert first.state.global_step == 5 and first.state.step_in_epoch == 5
    second, _ = _retrieval(log, tmp_path / "b")
    assert second.resume()
    second.fit(*data)
    assert second.state.global_step == total and second.state.done
    _same_weights(straight.model, second.model)
    assert second.state.losses == straight.state.losses  # the same batches, in the same order


def test_ranker_with_dropout_resumes_exactly(log_file, tmp_path):
    """Checkpoints carry the torch random state: a resumed run draws the dropout masks the
    uninterrupted run draws (without it, step 6 would reuse step 1's masks)."""
    log = _log(log_file)
    train = log.days(None, 20220428)
    req = build_requests(log, train, ExampleConfig(6, 4))

    def trainer(run_dir, max_steps=None):
        torch.manual_seed(0)
        cfg = RankerConfig(hash=HashConfig.uniform(num_buckets=31), transformer=TF,
                           actions=log.actions, continuous_actions=log.continuous_actions,
                           dropout=0.3)  # fmt: skip
        tc = TrainConfig(epochs=2, batch_size=16, max_steps=max_steps, checkpoint_every=3)
        return Trainer(PhoenixRanker(cfg), tc, run_dir, progress=False)

    hashes = RowHashes(log, HashConfig.uniform(num_buckets=31))
    straight = trainer(tmp_path / "a")
    straight.fit(log, hashes, req)
    trainer(tmp_path / "b", max_steps=5).fit(log, hashes, req)
    resumed = trainer(tmp_path / "b")
    assert resumed.resume()
    resumed.fit(log, hashes, req)
    assert resumed.state.global_step == straight.state.global_step
    _same_weights(straight.model, resumed.model)
    assert resumed.state.losses == straight.state.losses


def test_checkpoint_without_random_state_still_resumes(log_file, tmp_path, monkeypatch):
    """A checkpoint of an older version (no ``rng.*`` tensors) resumes: the position, weights
    and optimizers are restored; the random stream goes on from this process's."""
    log = _log(log_file)
    first, data = _retrieval(log, tmp_path, max_steps=4)
    monkeypatch.setattr(type(first), "_rng_state", lambda self: {})
    first.fit(*data)
    assert ckpt.load_checkpoint(first.checkpoint_path)[1].rng == {}
    monkeypatch.undo()
    second, _ = _retrieval(log, tmp_path)
    assert second.resume() and second.state.global_step == 4
    _same_weights(first.model, second.model)
    second.fit(*data)
    assert second.state.done
    assert set(ckpt.load_checkpoint(second.checkpoint_path)[1].rng) == {"cpu"}


def test_two_tower_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    log_file, tmp_path, monkeypatch
):
    from hashrec.training import retrieval as retrieval_module

    log = _log(log_file)
    trainer, data = _retrieval(log, tmp_path)  # checkpoint every 3 steps
    real, calls = retrieval_module.retrieval_loss, []

    def loss_goes_nan(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(retrieval_module, "retrieval_loss", loss_goes_nan)
    with pytest.raises(NonFiniteError, match=r"step 5: the loss is nan .* checkpoint \(step 3\)"):
        trainer.fit(*data)
    _, info = ckpt.load_checkpoint(trainer.checkpoint_path)
    assert info.train_state.global_step == 3
    assert trainer.state.global_step == 4  # the bad step was never taken: the weights are
    monkeypatch.undo()  # those of a run stopped after 4 good steps
    four, _ = _retrieval(log, tmp_path / "four", max_steps=4)
    four.fit(*data)
    _same_weights(four.model, trainer.model)


# -- hashrec train-retrieval: the run lock and the strict resume check of ``hashrec train`` -----

ARCH = ["--dim", "8", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--history-len", "6",
        "--batch-size", "16"]  # fmt: skip


def _argv(log_file, out, *extra):
    return ["train-retrieval", "--data", str(log_file), "--schema", SCHEMA_JSON, "--train-end",
            "2022-04-28", "--eval-start", "2022-04-29", "--out", str(out), *ARCH,
            *extra]  # fmt: skip


def test_train_retrieval_refuses_a_second_run_into_the_same_folder(log_file, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from hashrec.training.runlock import RunLock;"
         f"RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        err = cli_error(_argv(log_file, out, "--epochs", "1"), capsys, 1)
        assert f"{out} is in use by process {holder.pid} (lock file {out / LOCK_NAME})" in err
        assert "wait for it to finish or choose another --out" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    # the killed holder left its lock file: the next run takes it over with a notice
    assert main(_argv(log_file, out, "--epochs", "1")) == 0
    printed = capsys.readouterr().out
    assert f"was left by process {holder.pid}, which no longer holds it; taking it over" in printed
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert (out / "checkpoint.safetensors").exists() and (out / "metrics.json").exists()


def test_train_retrieval_resume_refuses_settings_that_change_training(log_file, tmp_path,
                                                                      capsys):  # fmt: skip
    out = tmp_path / "run"
    assert main(_argv(log_file, out, "--epochs", "2")) == 0
    config = (out / "config.json").read_bytes()
    weights = (out / "checkpoint.safetensors").read_bytes()
    for argv, key in [
        (["--batch-size", "8"], "train.batch_size: 16 in the checkpoint, 8 now"),
        (["--lr", "0.01"], "train.lr: 0.002 in the checkpoint, 0.01 now"),
        (["--history-len", "4"], "history_len: 6 in the checkpoint, 4 now"),
        (["--dim", "16"], "model_config.transformer.dim: 8 in the checkpoint, 16 now"),
        (["--positive-actions", "like"],
         "train.positive_actions[0]: click in the checkpoint, like now"),
        (["--no-log-q"], "train.log_q_correction: True in the checkpoint, False now"),
        (["--train-end", "2022-04-27"], "split.train_end: 20220428 in the checkpoint, 20220427"),
        (["--epochs", "1"], "train.epochs: 1 now, but the checkpoint has started epoch 2"),
    ]:  # fmt: skip
        err = cli_error(_argv(log_file, out, "--epochs", "2", "--resume", *argv), capsys, 1)
        assert f"{out / 'checkpoint.safetensors'}: cannot resume with settings that change " \
               "training" in err and key in err, err  # fmt: skip
        assert (out / "config.json").read_bytes() == config  # decided before any write
        assert (out / "checkpoint.safetensors").read_bytes() == weights
    # the data changed: its fingerprint differs
    text = log_file.read_text().splitlines()
    log_file.write_text("\n".join([text[0], *text[2:]]) + "\n")
    err = cli_error(_argv(log_file, out, "--epochs", "2", "--resume"), capsys, 1)
    assert "cannot resume with settings that change training: data: " in err
    log_file.write_text("\n".join(text) + "\n")
    # settings that may change: more epochs continue the finished run; the evaluation days
    assert main(_argv(log_file, out, "--resume", "--epochs", "3", "--eval-end",
                      "2022-04-30")) == 0  # fmt: skip
    assert "resumed from" in capsys.readouterr().out
    state = ckpt.read_checkpoint_metadata(out / "checkpoint.safetensors")["train_state"]
    assert state["epoch"] == 3 and state["done"]
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 3


def test_train_retrieval_resume_without_a_checkpoint_says_so(log_file, tmp_path, capsys):
    assert main(_argv(log_file, tmp_path / "fresh", "--epochs", "1", "--resume")) == 0
    assert "holds no checkpoint yet; training from the start" in capsys.readouterr().out


def test_train_retrieval_out_naming_a_file_is_a_usage_error(log_file, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("precious")
    err = cli_error(_argv(log_file, a_file), capsys, 2)
    assert f"--out {a_file} is a file, expected a folder" in err
    assert a_file.read_text() == "precious"


def test_train_retrieval_resume_refuses_a_ranker_checkpoint(log_file, tmp_path, capsys):
    out = tmp_path / "run"
    torch.manual_seed(0)
    log = _log(log_file)
    cfg = RankerConfig(hash=HashConfig.uniform(num_buckets=31), transformer=TF,
                       actions=log.actions, continuous_actions=log.continuous_actions)  # fmt: skip
    tr = Trainer(PhoenixRanker(cfg), TrainConfig(max_steps=1, batch_size=8), out, progress=False)
    tr.fit(log, RowHashes(log, cfg.hash), build_requests(log, log.days(None, 20220428),
                                                         ExampleConfig(6, 4)))  # fmt: skip
    weights = (out / "checkpoint.safetensors").read_bytes()
    err = cli_error(_argv(log_file, out, "--resume"), capsys, 1)
    assert "holds a PhoenixRanker, this run trains a TwoTowerRetriever" in err
    assert (out / "checkpoint.safetensors").read_bytes() == weights
    assert not (out / "config.json").exists()
