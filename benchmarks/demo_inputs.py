"""The demo config's training inputs on a KuaiRand folder, built as `hashrec train` builds them:
shared by the step benchmarks (`profile_train.py`, `ab_step.py`, `count_ops.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hashrec.cli.common import experiment_specs
from hashrec.cli.dispatch import build_parser
from hashrec.data import ExampleConfig, InteractionLog, load_kuairand
from hashrec.data.collate import RowHashes
from hashrec.data.requests import Requests, build_requests
from hashrec.evaluation.experiment import ModelSpec, Split, model_log
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
