"""The demo config's training inputs on a KuaiRand folder, built as `hashrec train` builds them,
and its model with the trainer's two optimizers: shared by the step benchmarks
(`profile_train.py`, `ab_step.py`, `bench_train_step.py`, `count_ops.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hashrec.cli.common import experiment_specs
from hashrec.cli.dispatch import build_parser
from hashrec.data import ExampleConfig, InteractionLog, load_kuairand
from hashrec.data.collate import LabelledBatch, RowHashes
from hashrec.data.requests import Requests, build_requests
from hashrec.evaluation.experiment import ModelSpec, Split, model_log, ranker_config
from hashrec.models.losses import loss_terms
from hashrec.models.ranker import PhoenixRanker, RankerOutput
from hashrec.nn.attention import AttentionKernel
from hashrec.nn.optim import RowWiseAdagrad
from hashrec.training.loop import dense_optimizer
from hashrec.training.trainer import TrainConfig

# the study's final split: train 2022-04-25..05-02 (the 11 shared days' first eight)
SPLIT = Split(train_end=20220502, eval_start=20220503, eval_end=20220505)


@dataclass
class DemoInputs:
    log: InteractionLog  # as the model sees it (side numbers standardised on the training rows)
    spec: ModelSpec
    examples: ExampleConfig
    train: TrainConfig
    hashes: RowHashes
    requests: Requests  # the training days' requests


def demo_inputs(data: str, train_args: Sequence[str] = ()) -> DemoInputs:
    """``hashrec train --data DATA *train_args``'s model spec, examples and training requests."""
    args = build_parser().parse_args(["train", "--data", data, *train_args])
    log = load_kuairand(data)
    spec, examples, train = experiment_specs(args, log, SPLIT)
    rows = SPLIT.masks(log)[0]
    log = model_log(log, spec, rows)
    hashes = RowHashes(log, spec.hash_config, spec.vocab)
    return DemoInputs(log, spec, examples, train, hashes, build_requests(log, rows, examples))


@dataclass
class DemoStep:
    """The demo config's ranker and its two optimizers; a call is one training step of a batch
    as the trainer takes it: forward, the masked per-action losses, backward, AdamW on the dense
    weights, row-wise Adagrad on the table."""

    model: PhoenixRanker
    dense: torch.optim.Optimizer
    table: RowWiseAdagrad
    continuous_weight: float

    def __call__(self, lb: LabelledBatch, kernel: AttentionKernel | None = None) -> RankerOutput:
        out = self.model(lb.batch, side=lb.side, kernel=kernel)
        terms = loss_terms(out, lb.labels, lb.label_mask, lb.continuous)
        terms.loss(self.continuous_weight).backward()
        self.dense.step()
        self.dense.zero_grad(set_to_none=True)
        self.table.step()
        self.table.zero_grad(set_to_none=True)
        return out


def demo_step(d: DemoInputs, device: torch.device | None = None) -> DemoStep:
    """A fresh model of ``d``'s spec (seed 0, training mode) on ``device`` (default: the CPU),
    with the trainer's optimizers at ``d.train``'s learning rates."""
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model = PhoenixRanker(ranker_config(d.log, d.spec)).to(device)
    model.train()
    dense = dense_optimizer(model.dense_parameters(), d.train.lr, d.train.weight_decay, device)
    table = RowWiseAdagrad(model.table.parameters(), lr=d.train.table_lr)
    return DemoStep(model, dense, table, d.train.continuous_weight)
