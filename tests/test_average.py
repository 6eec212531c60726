"""The dense weights' moving average (``TrainConfig.ema_decay``, ``--ema-decay``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hashrec.training import distributed
from hashrec.training.average import WeightAverage
from hashrec.training.checkpoint import load_checkpoint
from hashrec.training.loop import EpochTrainer
from hashrec.training.trainer import TrainConfig

from dist_worker import tiny_trainer


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


def _trainer(log_file, run_dir, **train):
    """(log, hashes, requests, trainer): the tests' tiny ranker, a checkpoint every 3 steps."""
    return tiny_trainer(log_file, run_dir, **{"checkpoint_every": 3, **train})


def test_the_average_leaves_training_alone_and_the_run_ends_with_it(log_file, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """Same seed with and without the average: the same steps (the average never feeds back);
    the averaged run ends with the dense weights' average, its table as trained."""
    log, hashes, req, plain = _trainer(log_file, tmp_path / "plain")
    trajectory = [[p.detach().clone() for p in plain.model.dense_parameters()]]
    step = EpochTrainer.step

    def recording_step(self, step_loss, indices):
        out = step(self, step_loss, indices)
        trajectory.append([p.detach().clone() for p in self.model.dense_parameters()])
        return out

    monkeypatch.setattr(EpochTrainer, "step", recording_step)
    plain.fit(log, hashes, req)
    monkeypatch.undo()
    averaged = _trainer(log_file, tmp_path / "ema", ema_decay=0.95)[3]
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


def test_a_run_with_the_average_resumes_exactly(log_file, tmp_path):
    log, hashes, req, straight = _trainer(log_file, tmp_path / "a", ema_decay=0.9)
    straight.fit(log, hashes, req)
    _trainer(log_file, tmp_path / "b", ema_decay=0.9, max_steps=5)[3].fit(log, hashes, req)
    resumed = _trainer(log_file, tmp_path / "b", ema_decay=0.9)[3]
    assert resumed.resume() and resumed.average.updates == 5
    resumed.fit(log, hashes, req)
    assert resumed.state.losses == straight.state.losses
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_a_finished_run_continued_for_more_epochs_equals_the_straight_run(log_file, tmp_path):
    """A finished run ends with the averages, yet continuing it (more epochs) trains on from
    the weights it reached: 2 epochs then 3 equal 3 straight, steps and final weights."""
    log, hashes, req, straight = _trainer(log_file, tmp_path / "a", ema_decay=0.9, epochs=3)
    straight.fit(log, hashes, req)
    first = _trainer(log_file, tmp_path / "b", ema_decay=0.9, epochs=2)[3]
    first.fit(log, hashes, req)
    assert first.state.done and first.average.finished
    more = _trainer(log_file, tmp_path / "b", ema_decay=0.9, epochs=3)[3]
    assert more.resume() and more.average.finished
    more.fit(log, hashes, req)
    assert more.state.done and more.state.losses == straight.state.losses
    for (name, a), b in zip(straight.model.state_dict().items(),
                            more.model.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_resume_refuses_another_decay(log_file, tmp_path):
    log, hashes, req, first = _trainer(log_file, tmp_path, ema_decay=0.9, max_steps=4)
    first.fit(log, hashes, req)
    with pytest.raises(ValueError, match="ema_decay"):
        _trainer(log_file, tmp_path)[3].resume()


def test_validation_scores_the_averaged_weights(log_file, tmp_path):
    """What ``validate`` sees (and the best checkpoint keeps) is the average; training then
    continues from its own weights."""
    model = _trainer(log_file, tmp_path)[3].model
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
    plain_model = _trainer(log_file, tmp_path / "p")[3].model
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
