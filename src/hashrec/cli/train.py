"""``hashrec train``: train a ranker on a log, evaluate it against baselines on later days."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from hashrec.cli import common
from hashrec.files import write_json_atomic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a ranker on a log and evaluate it",
                       description="Train on days up to --train-end, evaluate on --eval-start.. "
                       "--eval-end against baselines computed on the same split.")  # fmt: skip
    common.add_data_options(p)
    p.add_argument("--train-end", type=common.date, default=20220502, help="last training day")
    p.add_argument("--out", default="runs/train", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--full-table", action="store_true",
                   help="also train the collision-free (one row per ID) model")  # fmt: skip
    common.add_model_options(p)
    p.set_defaults(func=run)


def run_experiment(args: argparse.Namespace, log, train_end: int, with_full_table: bool,
                   resume: bool = False, with_phoenix: bool = False) -> None:  # fmt: skip
    """Shared by ``train`` and ``demo``: resolve and check everything, then (holding the run
    folder's lock) decide on resuming, write config.json, run, print. ``with_phoenix``: also
    train plain Phoenix multi-hash at the same bytes when the table scheme is another one, so
    the table shows both."""
    from hashrec.evaluation import experiment
    from hashrec.training.runlock import RunLock

    split = common.split(args, train_end)
    split.masks(log)  # fail before training if a split is empty
    spec, examples, train_cfg = common.experiment_specs(args, log, split)
    experiment.ranker_config(log, spec)  # a log the model cannot take fails before any write
    also = []
    if with_phoenix and args.table_scheme != "multihash":
        phoenix = argparse.Namespace(**{**vars(args), "table_scheme": "multihash"})
        also.append(common.experiment_specs(phoenix, log, split)[0])
    out = common.out_folder(args.out)
    with RunLock(out, say=print):
        checkpoint = out / "checkpoint.safetensors"
        if resume and not experiment.check_resume(
            checkpoint, log, split, spec, examples, train_cfg
        ):
            print(f"note: --resume: {out} holds no checkpoint yet; training from the start")
        resolved = {"command": args.command, "data": args.data or "kuairand sample",
                    "split": asdict(split), "examples": asdict(examples),
                    "train": asdict(train_cfg), "hash": spec.hash_config.to_dict(),
                    "transformer": asdict(spec.transformer), "device": args.device,
                    "dropout": spec.dropout, "side_features": spec.side_features,
                    "rate_features": spec.rate_features, "seeds": args.seeds}  # fmt: skip
        write_json_atomic(out / "config.json", resolved)
        seeds = tuple(range(args.seed, args.seed + args.seeds))
        res = experiment.run(log, split, spec, examples, train_cfg, out,
                             with_full_table=with_full_table, also=also, resume=resume,
                             device=args.device, say=lambda m: print(m, flush=True),
                             seeds=seeds)  # fmt: skip
    common.print_experiment(res)
    print(f"wrote {out}/metrics.json, results.md, results.png, checkpoint.safetensors")


def run(args: argparse.Namespace) -> int:
    log = common.load_data(args)
    run_experiment(args, log, args.train_end, args.full_table, resume=args.resume)
    return 0
