"""Checkpoints written by an earlier hashrec (``tests/fixtures/checkpoints``, made by
``make_checkpoints.py`` there before the model configs shared ``HashedModelConfig`` and before
checkpoints held the random state) still load, keep their config's JSON form, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hashrec.models.ranker import PhoenixRanker, RankerConfig
from hashrec.models.two_tower import TwoTowerConfig, TwoTowerRetriever
from hashrec.training.checkpoint import load_checkpoint, read_checkpoint_metadata
from hashrec.training.retrieval import RetrievalTrainConfig, RetrievalTrainer
from hashrec.training.trainer import TrainConfig, Trainer

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
CASES = {
    "ranker": ("PhoenixRanker", PhoenixRanker, RankerConfig, Trainer, TrainConfig),
    "two_tower": ("TwoTowerRetriever", TwoTowerRetriever, TwoTowerConfig, RetrievalTrainer,
                  RetrievalTrainConfig),
}  # fmt: skip


def _as_stored(written, stored):
    """``written`` restricted, at every level, to the keys ``stored`` has."""
    if isinstance(written, dict) and isinstance(stored, dict):
        return {k: _as_stored(written[k], v) for k, v in stored.items() if k in written}
    if isinstance(written, list) and isinstance(stored, list) and len(written) == len(stored):
        return [_as_stored(w, v) for w, v in zip(written, stored, strict=True)]
    return written


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_old_checkpoint_loads_with_the_same_config_json(name):
    path = FIXTURES / f"{name}.safetensors"
    class_name, model_cls, config_cls, _, _ = CASES[name]
    stored = read_checkpoint_metadata(path)["model_config"]
    model, info = load_checkpoint(path)
    assert info.model_class == class_name and isinstance(model, model_cls)
    assert isinstance(model.config, config_cls)
    # the shared helpers write the JSON the per-class ones wrote, to the letter (fields added
    # since then are left out of the comparison: they take their defaults)
    assert _as_stored(json.loads(json.dumps(model.config.to_dict())), stored) == stored
    assert config_cls.from_dict(stored) == model.config
    assert model.config.num_actions == 2 and model.config.dim == 8
    assert info.rng == {} and info.train_state.global_step == 2
    assert all(len(opt["state"]) > 0 for opt in info.optimizers.values())
    if name == "ranker":  # nested side config and a feature block survive the round trip
        assert model.config.side.post_fields == 2 and model.config.hash["feature"].num_buckets == 17


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_old_training_checkpoint_resumes(name, tmp_path):
    _, model_cls, _, trainer_cls, train_cls = CASES[name]
    (tmp_path / "checkpoint.safetensors").write_bytes(
        (FIXTURES / f"{name}.safetensors").read_bytes()
    )
    saved, info = load_checkpoint(tmp_path / "checkpoint.safetensors")
    kwargs = {"positive_actions": ("click",)} if name == "two_tower" else {}
    trainer = trainer_cls(model_cls(saved.config), train_cls(epochs=1, **kwargs), tmp_path,
                          progress=False)  # fmt: skip
    trainer.extra = dict(info.extra)
    assert trainer.resume()
    assert trainer.state.global_step == 2 and trainer.state.losses == [0.7, 0.6]
    for (n, a), b in zip(saved.state_dict().items(), trainer.model.state_dict().values(),
                         strict=True):  # fmt: skip
        assert torch.equal(a, b), n
    assert len(trainer.dense.state) == len(info.optimizers["dense"]["state"])
