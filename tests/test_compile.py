"""``TrainConfig.compile``: the compiled, padded transformer trains as the eager packed one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hashrec.data import ExampleConfig, RowHashes, build_requests, load_kuairand
from hashrec.datasets import kuairand_sample_dir
from hashrec.hashing.config import HashConfig
from hashrec.models.ranker import PhoenixRanker, RankerConfig
from hashrec.nn.transformer import TransformerConfig
from hashrec.training.checkpoint import load_checkpoint
from hashrec.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.slow  # compiling takes ~10-30 s on 2 cores


def _fit(tmp_path, compile: bool):
    log = load_kuairand(kuairand_sample_dir())
    cfg = RankerConfig(hash=HashConfig.uniform(num_buckets=1000), actions=log.actions,
                       continuous_actions=log.continuous_actions,
                       transformer=TransformerConfig(dim=8, num_layers=1, num_q_heads=2,
                                                     num_kv_heads=1, attention="full"))  # fmt: skip
    requests = build_requests(log, log.days(20220425, 20220425), ExampleConfig(6, 5))
    torch.manual_seed(0)
    model = PhoenixRanker(cfg)
    trainer = Trainer(model, TrainConfig(max_steps=4, batch_size=16, compile=compile),
                      tmp_path / ("c" if compile else "e"), progress=False)  # fmt: skip
    state = trainer.fit(log, RowHashes(log, cfg.hash), requests)
    return model, trainer, state


def test_compiled_training_matches_eager_and_saves_the_same_names(tmp_path):
    """The full mask, the kernel a GPU compiles (no graph break: the whole transformer)."""
    from torch._dynamo.utils import counters

    eager, _, s_eager = _fit(tmp_path, compile=False)
    counters.clear()
    compiled, trainer, s_comp = _fit(tmp_path, compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured it (not eager fallback)
    assert eager.pack_tokens and not compiled.pack_tokens
    assert compiled.transformer._compiled_call_impl is not None
    assert s_comp.global_step == s_eager.global_step == 4
    want = eager.state_dict()
    got = compiled.state_dict()
    assert got.keys() == want.keys()  # compiled in place: the checkpoint's names are the model's
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5, msg=name)
    loaded, _ = load_checkpoint(trainer.checkpoint_path)
    for name, w in loaded.state_dict().items():
        torch.testing.assert_close(w, got[name], rtol=0, atol=0, msg=name)


def test_cli_refuses_compile_on_a_cpu_and_over_processes(tmp_path, capsys, monkeypatch):
    from conftest import cli_error

    base = ["train", "--compile", "--out", str(tmp_path / "r")]
    assert "--compile is for GPUs (--device cuda)" in cli_error(base, capsys, 2)
    err = cli_error([*base, "--nproc", "2", "--val-days", "0"], capsys, 2)
    assert "--compile runs in one process only for now" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "--compile runs in one process only" in cli_error(base, capsys, 2)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def _compiling_trainer(tmp_path) -> Trainer:
    """A tiny ranker's trainer with ``compile=True``, not yet fitted (nothing compiled)."""
    log = load_kuairand(kuairand_sample_dir())
    cfg = RankerConfig(hash=HashConfig.uniform(num_buckets=100), actions=log.actions,
                       continuous_actions=log.continuous_actions,
                       transformer=TransformerConfig(dim=8, num_layers=1, num_q_heads=1,
                                                     num_kv_heads=1))  # fmt: skip
    return Trainer(PhoenixRanker(cfg), TrainConfig(max_steps=1, compile=True), tmp_path,
                   progress=False)  # fmt: skip


def test_the_trainer_refuses_compile_over_processes(tmp_path, monkeypatch):
    trainer = _compiling_trainer(tmp_path)
    monkeypatch.setattr(trainer, "ctx", dataclasses.replace(trainer.ctx, world=2))
    with pytest.raises(ValueError, match="compile .* runs in one process only"):
        trainer._compile()
    assert trainer.model.pack_tokens  # nothing changed


def test_resume_and_ensembles_accept_a_run_that_names_the_isolated_kernel():
    """Runs written before "auto" became the default name "isolated": the kernels agree, so
    neither resuming nor ensembling refuses them."""
    from hashrec.models.ensemble import same_configuration
    from hashrec.training.resume import resume_conflicts

    saved = {"model_config": {"transformer": {"attention": "isolated", "dim": 8}}}
    now = {"model_config": {"transformer": {"attention": "auto", "dim": 8}}}
    assert resume_conflicts(saved, now) == []
    wider = {"model_config": {"transformer": {"attention": "auto", "dim": 16}}}
    assert resume_conflicts(saved, wider) == [
        "model_config.transformer.dim: 8 in the checkpoint, 16 now"
    ]
    a = RankerConfig(hash=HashConfig.uniform(num_buckets=100),
                     transformer=TransformerConfig(dim=8, num_q_heads=2, num_kv_heads=1,
                                                   attention="isolated"))  # fmt: skip
    auto = dataclasses.replace(a, transformer=dataclasses.replace(a.transformer, attention="auto"))
    assert same_configuration(a, auto)
    assert not same_configuration(
        a, dataclasses.replace(auto, transformer=dataclasses.replace(a.transformer, num_layers=3))
    )


def test_the_trainer_refuses_compile_on_torch_before_2_5(tmp_path, monkeypatch):
    trainer = _compiling_trainer(tmp_path)
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    with pytest.raises(ValueError, match=r"needs torch >= 2.5, this is 2.4.1\+cpu"):
        trainer._compile()
    assert trainer.model.pack_tokens
