"""Within one request or within one user: where the ranker's GAUC gap comes from.

    python benchmarks/request_auc.py --runs runs/study_ranker

GAUC groups a user's impressions over all the evaluation days: it compares candidates the
ranker scored in different requests, with different histories. A ranker serving a feed only
ever orders the candidates of one request (one history). This script scores the evaluation
days (2022-05-03..05-05) with every study checkpoint under ``--runs``
(``**/runs/final-<config>-<seed>/best.safetensors``, written by ``study_ranker.py final``) and
with the baselines, and prints the AUC within each request and within each user (both weighted
by positives, groups with both labels), and the same checkpoint with the history cut off at
inference (``--no-history``: the same weights, ``history_len`` 0).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch

from hashrec.data import ExampleConfig, load_kuairand
from hashrec.data.collate import RowHashes
from hashrec.data.requests import build_requests
from hashrec.evaluation.experiment import Split, baseline_predictions, collision_free_config
from hashrec.evaluation.metrics import gauc
from hashrec.training.checkpoint import load_checkpoint
from hashrec.training.trainer import predict

SPLIT = Split(train_end=20220502, eval_start=20220503, eval_end=20220505)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/kuairand-pure")
    p.add_argument("--runs", default="runs/study_ranker", help="study_ranker.py --out folder(s)")
    p.add_argument("--actions", default="click,long_view")
    p.add_argument("--no-history", action="store_true",
                   help="also score each checkpoint with the history cut off")  # fmt: skip
    a = p.parse_args()
    log = load_kuairand(a.data)
    ev = log.days(SPLIT.eval_start, SPLIT.eval_end)
    vocab = collision_free_config(log)[1]
    actions = a.actions.split(",")
    idx = [list(log.actions).index(x) for x in actions]
    cols = " | ".join(f"{x} per request | {x} per user" for x in actions)
    print(f"| model | {cols} |\n|---|" + "---|" * (2 * len(actions)))

    def row(name: str, rows: np.ndarray, reqs: np.ndarray, probs: np.ndarray) -> None:
        cells = []
        for i in idx:
            y = log.labels[rows, i]
            cells += [
                f"{gauc(reqs, y, probs[:, i]):.4f}",
                f"{gauc(log.user[rows], y, probs[:, i]):.4f}",
            ]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    rows = reqs = None
    lens = (32, 0) if a.no_history else (32,)
    ckpts = sorted(Path(a.runs).glob("**/runs/final-*/best.safetensors"))
    if not ckpts:
        p.error(f"no study checkpoints under {a.runs} (run study_ranker.py final first)")
    for ck in ckpts:
        name = ck.parent.name
        model, _ = load_checkpoint(ck)
        model.eval()
        full = re.match(r"final-full-", name) is not None
        hashes = RowHashes(log, model.config.hash, vocab if full else None)
        for hl in lens:
            req = build_requests(log, ev, ExampleConfig(history_len=hl))
            pr = predict(model, log, hashes, req)
            if hl == 32:
                rows, reqs = pr.rows, pr.requests
            row(name + ("" if hl else " (no history)"), pr.rows, pr.requests, pr.probs)
    for name, probs in baseline_predictions(log, SPLIT, rows).items():
        row(name, rows, reqs, probs)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
