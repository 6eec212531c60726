"""What several commands share: errors and exit codes, option groups, data loading, configs.

Exit codes: 0 success; 2 usage errors (bad or conflicting options: argparse's convention);
1 data or runtime errors (a missing file, a bad column, a failed run). Either way the user sees
one line ``hashrec <command>: error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["UsageError", "add_data_options", "add_model_options", "date", "int_list"]


class UsageError(Exception):
    """Bad or conflicting options met past argparse: exit code 2."""


def int_list(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def date(text: str) -> int:
    digits = text.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        raise argparse.ArgumentTypeError(f"expected a date like 2022-05-03, got {text!r}")
    return int(digits)


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="KuaiRand folder, or a CSV/Parquet log with --schema "
                   "(default: the KuaiRand sample shipped with hashrec)")  # fmt: skip
    p.add_argument("--schema", help="JSON (file or string) mapping a generic log's columns")
    p.add_argument("--authors", help="table mapping post -> author, if the log lacks authors")
    p.add_argument("--eval-start", type=date, default=20220503, help="first evaluation day")
    p.add_argument("--eval-end", type=date, default=None, help="last evaluation day")


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] when available")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: one per core). Two runs sharing a "
                   "machine should split the cores (e.g. --threads 1 each on 2 cores): "
                   "oversubscribed threads stall each other for seconds per step")  # fmt: skip


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op thread count from ``--threads`` (commands that have it)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=int, default=32, help="embedding / transformer width D")
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=2, help="query heads")
    g.add_argument("--kv-heads", type=int, default=1, help="key/value heads (GQA)")
    g.add_argument("--num-hashes", type=int, default=2, help="hashes k per entity")
    g.add_argument("--table-fraction", type=float, default=0.25,
                   help="rows per entity block as a fraction of its distinct IDs")  # fmt: skip
    g.add_argument("--scheme", choices=("default", "phoenix"), default="default")
    g.add_argument("--history-len", type=int, default=32)
    g.add_argument("--max-candidates", type=int, default=16)
    g.add_argument("--slate-window", type=float, default=3600.0, help="seconds")
    g.add_argument("--negatives", type=int, default=0, help="sampled negatives per request")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--batch-size", type=int, default=128, help="requests per step")
    t.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (dense)")
    t.add_argument("--table-lr", type=float, default=0.05, help="row-wise Adagrad (table)")
    t.add_argument("--seed", type=int, default=0)
    add_device_option(p)


def load_data(args: argparse.Namespace):
    """The log named by --data/--schema/--authors (default: the shipped KuaiRand sample)."""
    from hashrec.data import LogSchema, load_kuairand, load_log
    from hashrec.datasets import kuairand_sample_dir

    path = args.data or kuairand_sample_dir()
    if os.path.isdir(path):
        return load_kuairand(path)
    if not args.schema:
        raise UsageError(
            f"--data {path} is a file: give --schema (JSON file or string) mapping its "
            "columns, or a KuaiRand folder"
        )
    text = Path(args.schema).read_text() if os.path.exists(args.schema) else args.schema
    schema = LogSchema.from_dict(json.loads(text))
    return load_log(path, schema, authors=args.authors)


def experiment_specs(args: argparse.Namespace, log) -> tuple[Any, Any, Any]:
    """(ModelSpec, ExampleConfig, TrainConfig) from the model/training options."""
    from hashrec.data import ExampleConfig
    from hashrec.evaluation.experiment import ModelSpec, hashed_config
    from hashrec.nn.transformer import TransformerConfig
    from hashrec.training.trainer import TrainConfig

    if not 0 < args.table_fraction:
        raise UsageError(f"--table-fraction must be > 0, got {args.table_fraction}")
    try:
        tf = TransformerConfig(dim=args.dim, num_layers=args.layers, num_q_heads=args.heads,
                               num_kv_heads=args.kv_heads, widening_factor=2.0)  # fmt: skip
        examples = ExampleConfig(args.history_len, args.max_candidates, args.slate_window,
                                 args.negatives)  # fmt: skip
        train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            table_lr=args.table_lr, seed=args.seed)  # fmt: skip
        name = f"hashed k={args.num_hashes}, {args.table_fraction:.0%} rows"
        spec = ModelSpec(name, hashed_config(log, args.table_fraction, args.num_hashes,
                                             args.scheme), tf)  # fmt: skip
    except ValueError as e:  # an option that makes no valid model: a usage error
        raise UsageError(str(e)) from e
    return spec, examples, train


def split(args: argparse.Namespace, train_end: int):
    from hashrec.evaluation.experiment import Split

    try:
        return Split(train_end=train_end, eval_start=args.eval_start, eval_end=args.eval_end)
    except ValueError as e:
        raise UsageError(str(e)) from e


def print_experiment(res) -> None:
    print()
    print(res.table)
    for name, i in res.models.items():
        print(
            f"{name}: {i['examples_per_s']:,.0f} training examples/s, "
            f"table {i['table_rows']:,} rows ({i['table_bytes'] / 2**20:.1f} MiB)"
        )
    print(f"evaluated on {res.eval_impressions:,} impressions of {res.eval_users:,} users; "
          f"wall time {res.wall_s:.0f} s")  # fmt: skip
