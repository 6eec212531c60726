"""``hashrec train``: train a ranker on a log, evaluate it against baselines on later days.

On several processes: ``--nproc N`` launches ``torchrun --standalone --nproc_per_node=N -m hashrec
train ...`` with the same options; or start ``torchrun`` yourself (several machines: its
rendezvous options). Every rank trains its slice of each global batch; rank 0 evaluates, prints
and writes the run folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Sequence
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
    p.add_argument("--compile", action="store_true",
                   help="compile the transformer (torch.compile) and run it on padded tokens, "
                   "fixed shapes: for long runs on a GPU (H200, demo config: 1.3-1.5x the "
                   "steps per second once compiled, after ~30 s of compiling per run, so the "
                   "shipped sample's short run is slower with it); refused on a CPU, where "
                   "the default packed path is faster")  # fmt: skip
    common.add_distributed_options(p)
    p.set_defaults(func=run)


def run_experiment(args: argparse.Namespace, log, train_end: int, with_full_table: bool,
                   resume: bool = False, with_phoenix: bool = False) -> None:  # fmt: skip
    """Shared by ``train`` and ``demo``: resolve and check everything, then (holding the run
    folder's lock) decide on resuming, write config.json, run, print. ``with_phoenix``: also
    train plain Phoenix multi-hash at the same bytes when the table scheme is another one, so
    the table shows both."""
    from hashrec.evaluation import experiment
    from hashrec.training.distributed import env_world
    from hashrec.training.loop import resolve_device
    from hashrec.training.runlock import RunLock

    split = common.split(args, train_end)
    train_rows, _ = split.masks(log)  # fail before training if a split is empty
    spec, examples, train_cfg = common.experiment_specs(args, log, split)
    experiment.ranker_config(log, spec)  # a log the model cannot take fails before any write
    experiment.validation_split(log, train_rows, train_cfg)  # so does --val-days
    resolve_device(args.device)  # and a device this machine does not have
    also = []
    if with_phoenix and args.table_scheme != "multihash":
        phoenix = argparse.Namespace(**{**vars(args), "table_scheme": "multihash"})
        also.append(common.experiment_specs(phoenix, log, split)[0])
    out = common.out_folder(args.out)
    # several processes (torchrun): rank 0 holds the folder's lock, writes and reports
    main_rank = env_world()[0] == 0
    with RunLock(out, say=print) if main_rank else contextlib.nullcontext():
        checkpoint = out / "checkpoint.safetensors"
        if (
            resume
            and not experiment.check_resume(checkpoint, log, split, spec, examples, train_cfg)
            and main_rank
        ):
            print(f"note: --resume: {out} holds no checkpoint yet; training from the start")
        resolved = {"command": args.command, "data": args.data or "kuairand sample",
                    "split": asdict(split), "examples": asdict(examples),
                    "train": asdict(train_cfg), "hash": spec.hash_config.to_dict(),
                    "transformer": asdict(spec.transformer), "device": args.device,
                    "dropout": spec.dropout, "side_features": spec.side_features,
                    "rate_features": spec.rate_features, "seeds": args.seeds,
                    "user_bias_rows": spec.user_bias_rows,
                    "user_bias_actions": list(spec.user_bias_actions)}  # fmt: skip
        if main_rank:
            write_json_atomic(out / "config.json", resolved)
        seeds = tuple(range(args.seed, args.seed + args.seeds))
        res = experiment.run(log, split, spec, examples, train_cfg, out,
                             with_full_table=with_full_table, also=also, resume=resume,
                             device=args.device, say=lambda m: print(m, flush=True),
                             seeds=seeds)  # fmt: skip
    if res is None:  # a rank > 0 of a multi-process run: rank 0 reports
        return
    common.print_experiment(res)
    print(f"wrote {out}/metrics.json, results.md, results.png, checkpoint.safetensors")
    if train_cfg.refit:
        print(
            f"refit on every training day for the chosen epochs: {out}/{experiment.REFIT_DIR}/"
            "checkpoint.safetensors (the model evaluated above, the one to serve)"
        )


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line minus ``--nproc N`` / ``--nproc=N`` (what each launched rank runs)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(nproc: int, argv: Sequence[str]) -> None:
    """Run ``hashrec <argv>`` on ``nproc`` local processes through torchrun; wait for them."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    torchrun_args = get_args_parser().parse_args(
        ["--standalone", f"--nproc_per_node={nproc}", "--module", "hashrec", *argv]
    )
    try:
        torchrun(torchrun_args)
    except ChildFailedError as e:
        failed = ", ".join(
            f"rank {r} (exit code {f.exitcode})" for r, f in sorted(e.failures.items())
        )
        raise RuntimeError(f"{nproc} training processes: {failed} failed") from None


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise common.UsageError(f"--nproc must be >= 1, got {args.nproc}")
    if args.dist_timeout is not None and args.dist_timeout <= 0:
        raise common.UsageError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    from hashrec.training.distributed import TABLE_SHARDING, teardown
    from hashrec.training.loop import resolve_device

    if args.table_sharding is not None and args.table_sharding not in TABLE_SHARDING:
        raise common.UsageError(
            f"--table-sharding must be one of {', '.join(TABLE_SHARDING)}, "
            f"got {args.table_sharding!r}"
        )
    torchrun = os.environ.get("WORLD_SIZE", "1") not in ("", "1")
    if args.compile and (args.nproc > 1 or torchrun):
        raise common.UsageError("--compile runs in one process only for now: drop --nproc "
                                "(or torchrun) or --compile")  # fmt: skip
    if args.compile and resolve_device(args.device).type == "cpu":
        raise common.UsageError("--compile is for GPUs (--device cuda): on a CPU the default "
                                "packed path it replaces is faster")  # fmt: skip
    if args.nproc > 1 and torchrun:
        raise common.UsageError("--nproc under torchrun: give one or the other")
    if (args.nproc > 1 or torchrun) and args.refit:
        raise common.UsageError(
            "--refit needs the validation split, which runs in one process only for now: "
            "train without --nproc or torchrun"
        )
    if (args.nproc > 1 or torchrun) and (args.val_days or args.val_fraction):
        raise common.UsageError(
            "the validation split (early stopping) runs in one process only for now: "
            "with --nproc or torchrun pass --val-days 0"
        )
    if args.nproc > 1:
        launch(args.nproc, _without_nproc(args.argv))
        return 0
    log = common.load_data(args)
    try:
        run_experiment(args, log, args.train_end, args.full_table, resume=args.resume)
    except BaseException:
        teardown(wait=False)
        raise
    teardown()
    return 0
