"""The dense weights' moving average (``TrainConfig.ema_decay``, ``--ema-decay``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hashrec import HashConfig, PhoenixRanker, RankerConfig, TransformerConfig
from hashrec.data import ExampleConfig, LogSchema, RowHashes, build_requests, load_log
from hashrec.training import distributed
from hashrec.training.average import WeightAverage
from hashrec.training.checkpoint import load_checkpoint
from hashrec.training.loop import EpochTrainer
from hashrec.training.trainer import TrainConfig, Trainer

from conftest import SCHEMA_JSON, write_synthetic_log

TF = TransformerConfig(dim=8, num_layers=1, num_q_heads=2, num_kv_heads=1)


def _reference_average(trajectory: list[list[torch.Tensor]], decay: float) -> list[torch.Tensor]:
    """The average after each step's weights, one number at a time in float64:
    a <- d * a + (1 - d) * w with d = min(decay, (1 + n) / (10 + n)) at the n-th update."""
    avg = [t.double().clone() for t in trajectory[0]]
    for n, weights in enumerate(trajectory[1:], start=1):
        d = min(decay, (1 + n) / (10 + n))
        avg = [d * a + (1 - d) * w.double() for a, w in zip(avg, weights, strict=True)]
    return avg


def test_average_follows_the_ramped_recurrence():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    avg = WeightAverage(params, decay=0.9)
    trajectory = [[p.detach().clone() for p in params]]
    for _ in range(120):  # the ramp up to n = 80 ((1 + n) / (10 + n) < 0.9), then 0.9
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        avg.update()
        trajectory.append([p.detach().clone() for p in params])
    for a, r in zip(avg.average, _reference_average(trajectory, 0.9), strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)
    assert avg.updates == 120 and avg.current_decay() == 0.9
    assert WeightAverage(params, 0.9).current_decay() == pytest.approx(2 / 11)  # the first


def _averaged_once(start: torch.Tensor, end: torch.Tensor):
    """A parameter at ``start``, its average (decay 0.5), the parameter moved to ``end``, one
    update: (parameter, average, the average's value)."""
    w = torch.nn.Parameter(start.clone())
    avg = WeightAverage([w], decay=0.5)
    with torch.no_grad():
        w.copy_(end)
    avg.update()
    return w, avg, avg.average[0].clone()


def test_swapped_puts_the_averages_in_and_the_weights_back():
    w, avg, expected = _averaged_once(torch.arange(4.0), torch.arange(4.0) * 3.0)
    with avg.swapped():
        assert torch.equal(w.detach(), expected)
        with pytest.raises(RuntimeError, match="hold the averages"):
            avg.update()
        with pytest.raises(RuntimeError, match="already hold"), avg.swapped():
            pass
    assert torch.equal(w.detach(), torch.arange(4.0) * 3.0)
    assert torch.equal(avg.average[0], expected)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, math.nan])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        WeightAverage([torch.nn.Parameter(torch.zeros(1))], decay)
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        TrainConfig(ema_decay=decay)


def test_load_state_dict_refuses_other_tensors_or_decay():
    a = WeightAverage([torch.nn.Parameter(torch.zeros(2, 3))], 0.9)
    b = WeightAverage([torch.nn.Parameter(torch.zeros(3, 2))], 0.9)
    with pytest.raises(ValueError, match=r"holds 1 tensors \[\(2, 3\)\], expected 1 \[\(3, 2\)\]"):
        b.load_state_dict(a.state_dict())
    c = WeightAverage([torch.nn.Parameter(torch.zeros(2, 3))], 0.99)
    with pytest.raises(ValueError, match="decay 0.9, this run 0.99"):
        c.load_state_dict(a.state_dict())
    a.update()
    c = WeightAverage([torch.nn.Parameter(torch.ones(2, 3))], 0.9)
    c.load_state_dict(a.state_dict())
    assert c.updates == 1 and torch.equal(c.average[0], a.average[0])


def test_finish_keeps_the_weights_for_resume_and_the_state_records_it():
    w, avg, mean = _averaged_once(torch.zeros(3), torch.ones(3))
    avg.finish()
    avg.finish()  # once is enough
    assert torch.equal(w.detach(), mean) and torch.equal(avg.average[0], torch.ones(3))
    with pytest.raises(RuntimeError, match="resume"):
        avg.update()
    with pytest.raises(RuntimeError, match="already hold"), avg.swapped():
        pass
    state = avg.state_dict()
    assert state["param_groups"][0]["finished"]
    w2 = torch.nn.Parameter(mean.clone())  # as a checkpoint's model holds it
    again = WeightAverage([w2], decay=0.5)
    again.load_state_dict(state)
    assert again.finished
    for a in (avg, again):
        a.resume()
        a.resume()  # nothing more to undo
        assert not a.finished and torch.equal(a.params[0].detach(), torch.ones(3))
        assert torch.equal(a.average[0], mean)
    with pytest.raises(ValueError, match=r"holds 1 tensors \[None\]"):
        again.load_state_dict({"state": {0: {}}, "param_groups": state["param_groups"]})


@pytest.fixture
def ranker_data(tmp_path):
    path = tmp_path / "log.csv"
    write_synthetic_log(path)
    log = load_log(str(path), LogSchema.from_dict(json.loads(SCHEMA_JSON)))
    req = build_requests(log, log.days(None, 20220428), ExampleConfig(6, 4))
    return log, RowHashes(log, HashConfig.uniform(num_buckets=31)), req


def _trainer(log, run_dir, **train) -> Trainer:
    torch.manual_seed(0)
    cfg = RankerConfig(hash=HashConfig.uniform(num_buckets=31), transformer=TF,
                       actions=log.actions, continuous_actions=log.continuous_actions,
                       dropout=0.1)  # fmt: skip
    tc = TrainConfig(**{"epochs": 2, "batch_size": 16, "checkpoint_every": 3, **train})
    return Trainer(PhoenixRanker(cfg), tc, run_dir, progress=False)


def test_the_average_leaves_training_alone_and_the_run_ends_with_it(ranker_data, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """Same seed with and without the average: the same steps (the average never feeds back);
    the averaged run ends with the dense weights' average, its table as trained."""
    log, hashes, req = ranker_data
    plain = _trainer(log, tmp_path / "plain")
    trajectory = [[p.detach().clone() for p in plain.model.dense_parameters()]]
    step = EpochTrainer.step

    def recording_step(self, step_loss, indices):
        out = step(self, step_loss, indices)
        trajectory.append([p.detach().clone() for p in self.model.dense_parameters()])
        return out

    monkeypatch.setattr(EpochTrainer, "step", recording_step)
    plain.fit(log, hashes, req)
    monkeypatch.undo()
    averaged = _trainer(log, tmp_path / "ema", ema_decay=0.95)
    averaged.fit(log, hashes, req)
    assert averaged.state.losses == plain.state.losses  # training itself unchanged
    assert len(trajectory) == plain.state.global_step + 1 > 10
    torch.testing.assert_close(averaged.model.table.weight, plain.model.table.weight)
    reference = _reference_average(trajectory, 0.95)
    moved = 0
    for p, r, raw in zip(averaged.model.dense_parameters(), reference,
                         plain.model.dense_parameters(), strict=True):  # fmt: skip
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)
        moved += not torch.allclose(p, raw)
    assert moved > 0  # the averages differ from the last weights
    saved = averaged.model.state_dict()  # and the finished checkpoint holds them
    loaded, info = load_checkpoint(averaged.checkpoint_path)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, saved[name]), name
    assert "average" in info.optimizers


def test_a_run_with_the_average_resumes_exactly(ranker_data, tmp_path):
    log, hashes, req = ranker_data
    straight = _trainer(log, tmp_path / "a", ema_decay=0.9)
    straight.fit(log, hashes, req)
    _trainer(log, tmp_path / "b", ema_decay=0.9, max_steps=5).fit(log, hashes, req)
    resumed = _trainer(log, tmp_path / "b", ema_decay=0.9)
    assert resumed.resume() and resumed.average.updates == 5
    resumed.fit(log, hashes, req)
    assert resumed.state.losses == straight.state.losses
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_a_finished_run_continued_for_more_epochs_equals_the_straight_run(ranker_data, tmp_path):
    """A finished run ends with the averages, yet continuing it (more epochs) trains on from
    the weights it reached: 2 epochs then 3 equal 3 straight, steps and final weights."""
    log, hashes, req = ranker_data
    straight = _trainer(log, tmp_path / "a", ema_decay=0.9, epochs=3)
    straight.fit(log, hashes, req)
    first = _trainer(log, tmp_path / "b", ema_decay=0.9, epochs=2)
    first.fit(log, hashes, req)
    assert first.state.done and first.average.finished
    more = _trainer(log, tmp_path / "b", ema_decay=0.9, epochs=3)
    assert more.resume() and more.average.finished
    more.fit(log, hashes, req)
    assert more.state.done and more.state.losses == straight.state.losses
    for (name, a), b in zip(straight.model.state_dict().items(),
                            more.model.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_resume_refuses_another_decay(ranker_data, tmp_path):
    log, hashes, req = ranker_data
    _trainer(log, tmp_path, ema_decay=0.9, max_steps=4).fit(log, hashes, req)
    with pytest.raises(ValueError, match="ema_decay"):
        _trainer(log, tmp_path).resume()


def test_validation_scores_the_averaged_weights(ranker_data, tmp_path):
    """What ``validate`` sees (and the best checkpoint keeps) is the average; training then
    continues from its own weights."""
    log, _, _ = ranker_data
    model = _trainer(log, tmp_path).model
    trainer = EpochTrainer(model, TrainConfig(epochs=2, batch_size=4, ema_decay=0.8),
                           tmp_path / "run", progress=False)  # fmt: skip
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.normal(size=(8, model.config.num_actions))).float()

    def step_loss(indices):
        loss = (model.unembeddings - target).pow(2).sum()
        return distributed.StepLoss(loss, loss.item(), len(indices))

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    slot = next(i for i, p in enumerate(trainer.average.params) if p is model.unembeddings)

    def validate() -> float:
        seen.append((model.unembeddings.detach().clone(), trainer.average.average[slot].clone()))
        return -float(len(seen))  # the first epoch is the best

    trainer.run_epochs(10, step_loss, validate)
    assert len(seen) == 2
    # training went on from its own weights: the same steps as without the average
    plain_model = _trainer(log, tmp_path / "p").model
    plain = EpochTrainer(plain_model, TrainConfig(epochs=2, batch_size=4), tmp_path / "plain",
                         progress=False)  # fmt: skip

    def plain_loss(indices):
        loss = (plain_model.unembeddings - target).pow(2).sum()
        return distributed.StepLoss(loss, loss.item(), len(indices))

    plain.run_epochs(10, plain_loss, lambda: -float(len(plain.state.validation)))
    assert plain.state.losses == trainer.state.losses
    raw_weights = [w for _, w in seen]  # inside the swap the average slot holds the weights
    for scored, raw in seen:
        assert not torch.allclose(scored, raw)
    best, _ = load_checkpoint(trainer.best_path)
    assert torch.equal(best.unembeddings.detach(), seen[0][0])
    assert torch.equal(model.unembeddings.detach(), seen[0][0])  # the run ends with the best
    assert not torch.equal(raw_weights[0], raw_weights[1])


def test_the_cli_averages_by_default_and_ema_decay_0_is_off(tmp_path, capsys):
    from hashrec.cli import main
    from hashrec.cli.common import DEFAULT_EMA_DECAY
    from hashrec.training.checkpoint import read_checkpoint_metadata

    from conftest import cli_error

    path = tmp_path / "log.csv"
    write_synthetic_log(path)
    tiny = ["--data", str(path), "--schema", SCHEMA_JSON, "--dim", "8", "--layers", "1",
            "--heads", "2", "--kv-heads", "1", "--history-len", "4", "--max-candidates", "4",
            "--batch-size", "16", "--epochs", "1", "--seeds", "1", "--val-days", "0",
            "--train-end", "2022-04-28", "--eval-start", "2022-04-29"]  # fmt: skip
    for decay, out in ((None, "on"), ("0", "off")):
        extra = [] if decay is None else ["--ema-decay", decay]
        main(["train", *tiny, *extra, "--out", str(tmp_path / out)])
    on = read_checkpoint_metadata(next((tmp_path / "on").rglob("checkpoint.safetensors")))
    off = read_checkpoint_metadata(next((tmp_path / "off").rglob("checkpoint.safetensors")))
    assert on["extra"]["train"]["ema_decay"] == DEFAULT_EMA_DECAY > 0
    assert "average" in on["optimizer_groups"] and off["extra"]["train"]["ema_decay"] == 0
    assert "average" not in off["optimizer_groups"]
    err = cli_error(["train", *tiny, "--ema-decay", "1", "--out", str(tmp_path / "x")], capsys, 2)
    assert "--ema-decay" in err and "< 1" in err
