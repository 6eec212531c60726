"""``hashrec collisions``: expected vs measured hash collisions for ID sets."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from hashrec.cli import common
from hashrec.cli.common import UsageError, int_list, out_folder, whole
from hashrec.files import write_json_atomic, write_text_atomic

DEFAULT_BUCKETS = "1000,2000,5000,10000,20000,50000,100000,200000,1000000"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "collisions",
        help="expected vs measured hash collisions for an ID set",
        description="Birthday-view collision analysis: for n IDs hashed k times into N buckets, "
        "the IDs with an identical k-tuple of rows and the IDs sharing at least one row, "
        "expected (independent uniform hashes) next to measured (the real hasher).",
    )
    p.add_argument("--csv", metavar="FILE", help="CSV or Parquet file holding ID columns "
                   "(default: the shipped KuaiRand sample's video and author IDs)")  # fmt: skip
    p.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="NAME[:ENTITY]",
        help="ID column; ENTITY (user, post, author; default post) picks the Phoenix constants",
    )
    p.add_argument("--sequential", type=whole(0), default=0, metavar="N", help="also IDs 1..N")
    p.add_argument(
        "--random", type=whole(0), default=0, metavar="N", help="also N random int64 IDs"
    )
    p.add_argument(
        "--buckets",
        type=int_list,
        default=int_list(DEFAULT_BUCKETS),
        help=f"buckets N per hash (default {DEFAULT_BUCKETS})",
    )
    p.add_argument("--hashes", type=int_list, default=[1, 2, 3], help="k values (default 1,2,3)")
    p.add_argument(
        "--schemes",
        type=lambda s: s.split(","),
        default=["default", "phoenix"],
        help="default and/or phoenix (phoenix has k <= 2)",
    )
    p.add_argument(
        "--layout",
        choices=("fused", "separate"),
        default="fused",
        help="fused: Phoenix's one block per entity type; separate: one table per hash",
    )
    p.add_argument("--seed", type=whole(0), default=0, help="seed of the default scheme")
    p.add_argument("--out", default="runs/collisions", help="output folder (table, JSON, PNG)")
    h = p.add_argument_group("hybrid table (instead of the ID-set study)")
    h.add_argument("--hybrid", type=common.number(0, 1e6), metavar="FRACTION",
                   help="report the hybrid layout at this byte budget (as --table-fraction): "
                   "per entity, the training impressions whose ID owns a private row; reads "
                   "--data (default: the shipped KuaiRand sample)")  # fmt: skip
    h.add_argument("--train-end", type=common.date, default=20220502,
                   help="last training day (IDs are counted on days up to it)")  # fmt: skip
    h.add_argument("--num-hashes", type=whole(1), default=2, help="k of the hashed tail")
    h.add_argument("--dim", type=whole(1), default=32, help="embedding width (sets bytes per row)")
    common.add_data_options(h)
    p.set_defaults(func=run)


def run_hybrid(args: argparse.Namespace) -> int:
    from hashrec.analysis.hybrid import format_hybrid, hybrid_coverage
    from hashrec.data.tables import table_config

    if not 0 < args.hybrid:
        raise UsageError(f"--hybrid must be > 0, got {args.hybrid}")
    if args.csv or args.column or args.sequential or args.random:
        raise UsageError("--hybrid reads a log (--data): drop --csv/--column/--sequential/--random")
    log = common.load_data(args)
    train, later = common.split(args, args.train_end).masks(log)
    try:
        cfg = table_config(log, train, "hybrid", args.hybrid, args.num_hashes, dim=args.dim)
    except ValueError as e:
        raise UsageError(str(e)) from e
    rows = hybrid_coverage(log, train, later, cfg)
    table = format_hybrid(rows)
    print(f"hybrid table at {args.hybrid:.0%} of the full table's bytes; training days up to "
          f"{args.train_end}, later days from {args.eval_start}\n")  # fmt: skip
    print(table)
    out = out_folder(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "hybrid.json", rows)
    write_text_atomic(out / "hybrid.md", table + "\n")
    print(f"\nwrote {out / 'hybrid.md'}, {out / 'hybrid.json'}")
    return 0


def _read_id_columns(path: Path, specs: list[str]) -> dict[str, tuple[np.ndarray, str]]:
    """--column NAME[:ENTITY] -> {NAME: (ids, entity)} read from a CSV or Parquet file."""
    from hashrec.data import read_columns

    parsed = []
    for spec in specs:
        col, _, entity = spec.partition(":")
        entity = entity or "post"
        if entity not in ("user", "post", "author"):
            raise UsageError(f"--column {spec}: entity must be user, post or author")
        parsed.append((col, entity))
    table = read_columns(str(path), [c for c, _ in parsed], kinds="iu")
    return {col: (table[col].astype(np.int64), entity) for col, entity in parsed}


def run(args: argparse.Namespace) -> int:
    from hashrec.analysis.collisions import format_table, plot_study, study

    if args.hybrid is not None:
        return run_hybrid(args)
    out = out_folder(args.out)
    if min(args.buckets) < 2:
        raise UsageError(f"--buckets: every N must be >= 2, got {min(args.buckets)}")
    if min(args.hashes) < 1:
        raise UsageError(f"--hashes: every k must be >= 1, got {min(args.hashes)}")
    for s in args.schemes:
        if s not in ("default", "phoenix"):
            raise UsageError(f"--schemes: unknown scheme {s!r}, expected default or phoenix")
    if args.schemes == ["phoenix"] and min(args.hashes) > 2:
        raise UsageError(
            f"--hashes {','.join(map(str, args.hashes))} with --schemes phoenix: Phoenix has "
            "2 hashes per entity, so nothing would be measured"
        )
    id_sets: dict[str, tuple[np.ndarray, str]] = {}
    if args.csv is not None:
        if not args.column:
            raise UsageError("--csv needs at least one --column NAME[:ENTITY]")
        id_sets.update(_read_id_columns(Path(args.csv), args.column))
    elif args.column:
        raise UsageError("--column needs --csv FILE")
    if args.sequential:
        id_sets[f"sequential 1..{args.sequential}"] = (np.arange(1, args.sequential + 1), "post")
    if args.random:
        rng = np.random.default_rng(args.seed)
        id_sets[f"random {args.random}"] = (rng.integers(1, 2**62, args.random), "post")
    if not id_sets:  # default: the video and author IDs of the shipped KuaiRand sample
        from hashrec.datasets import kuairand_sample_dir

        videos = os.path.join(kuairand_sample_dir(), "video_features_basic_sample.csv.gz")
        print(f"(no ID set given: using the KuaiRand sample's video and author IDs, {videos})")
        id_sets.update(_read_id_columns(Path(videos), ["video_id:post", "author_id:author"]))
    rows = []
    for name, (ids, entity) in id_sets.items():
        schemes = [s if s == "default" else f"phoenix-{entity}" for s in args.schemes]
        rows += study({name: ids}, args.buckets, args.hashes, schemes, args.layout, args.seed)
    table = format_table(rows)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "collisions.json", [r.to_dict() for r in rows])
    write_text_atomic(out / "collisions.md", table + "\n")
    plot_study(rows, str(out / "collisions.png"))
    print(f"\nwrote {out / 'collisions.md'}, {out / 'collisions.json'}, {out / 'collisions.png'}")
    return 0
