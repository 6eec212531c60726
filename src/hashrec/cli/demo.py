"""``hashrec demo``: the whole story on the KuaiRand-Pure sample shipped with hashrec."""

from __future__ import annotations

import argparse

from hashrec.cli import common
from hashrec.cli.train import run_experiment


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train and evaluate on the shipped KuaiRand sample",
                       description="The whole story on the KuaiRand-Pure sample shipped with "
                       "hashrec: train the hashed ranker (and plain Phoenix multi-hash at the same "
                       "bytes when --table-scheme names another layout) and a collision-free one, "
                       "score the "
                       "popularity and logistic-regression baselines on the same split, print the "
                       "table, write metrics and plots.")  # fmt: skip
    p.add_argument("--out", default="runs/demo", help="run folder")
    common.add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.data = args.schema = args.authors = None
    args.eval_start, args.eval_end = 20220503, 20220505
    print("hashrec demo: KuaiRand-Pure sample (Gao et al., CIKM 2022; CC BY-SA 4.0), "
          "train 2022-04-25..05-02, evaluate 05-03..05-05")  # fmt: skip
    log = common.load_data(args)
    run_experiment(args, log, 20220502, with_full_table=True, with_phoenix=True)
    return 0
