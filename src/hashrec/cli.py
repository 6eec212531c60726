"""The ``hashrec`` command. Each subcommand parses its options, then calls the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hashrec import __version__

DEFAULT_BUCKETS = "1000,2000,5000,10000,20000,50000,100000,200000,1000000"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _read_id_columns(path: Path, specs: list[str]) -> dict[str, tuple[np.ndarray, str]]:
    """--column NAME[:ENTITY] -> {NAME: (ids, entity)} read from a CSV or Parquet file."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.exists():
        raise SystemExit(f"error: --csv {path}: no such file")
    parsed = []
    for spec in specs:
        col, _, entity = spec.partition(":")
        entity = entity or "post"
        if entity not in ("user", "post", "author"):
            raise SystemExit(f"error: --column {spec}: entity must be user, post or author")
        parsed.append((col, entity))
    cols = [c for c, _ in parsed]
    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path, columns=cols)
        else:
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(include_columns=cols))
    except Exception as e:  # pyarrow raises several types for missing columns / bad files
        raise SystemExit(f"error: reading {path}: {e}") from e
    out = {}
    for col, entity in parsed:
        arr = table.column(col).to_numpy()
        if arr.dtype.kind not in "iu":
            raise SystemExit(
                f"error: column {col} of {path} has dtype {arr.dtype}, expected integers"
            )
        out[col] = (arr.astype(np.int64), entity)
    return out


def cmd_collisions(args: argparse.Namespace) -> int:
    from hashrec.collisions import format_table, plot_study, study

    id_sets: dict[str, tuple[np.ndarray, str]] = {}
    if args.csv is not None:
        if not args.column:
            raise SystemExit("error: --csv needs at least one --column NAME[:ENTITY]")
        id_sets.update(_read_id_columns(Path(args.csv), args.column))
    elif args.column:
        raise SystemExit("error: --column needs --csv FILE")
    if args.sequential:
        id_sets[f"sequential 1..{args.sequential}"] = (np.arange(1, args.sequential + 1), "post")
    if args.random:
        rng = np.random.default_rng(args.seed)
        id_sets[f"random {args.random}"] = (rng.integers(1, 2**62, args.random), "post")
    if not id_sets:
        raise SystemExit(
            "error: give an ID set: --csv FILE --column NAME[:ENTITY], --sequential N or --random N"
        )
    rows = []
    for name, (ids, entity) in id_sets.items():
        schemes = [s if s == "default" else f"phoenix-{entity}" for s in args.schemes]
        for s in args.schemes:
            if s not in ("default", "phoenix"):
                raise SystemExit(
                    f"error: --schemes: unknown scheme {s!r}, expected default or phoenix"
                )
        rows += study({name: ids}, args.buckets, args.hashes, schemes, args.layout, args.seed)
    table = format_table(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "collisions.json", json.dumps([r.to_dict() for r in rows], indent=2))
    _atomic_write_text(out / "collisions.md", table + "\n")
    plot_study(rows, str(out / "collisions.png"))
    print(f"\nwrote {out / 'collisions.md'}, {out / 'collisions.json'}, {out / 'collisions.png'}")
    return 0


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hashrec",
        description="Hash-embedding recommenders in the style of X's For You ranking (Phoenix).",
    )
    parser.add_argument("--version", action="version", version=f"hashrec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "collisions",
        help="expected vs measured hash collisions for an ID set",
        description="Birthday-view collision analysis: for n IDs hashed k times into N buckets, "
        "the IDs with an identical k-tuple of rows and the IDs sharing at least one row, "
        "expected (independent uniform hashes) next to measured (the real hasher).",
    )
    p.add_argument("--csv", metavar="FILE", help="CSV or Parquet file holding ID columns")
    p.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="NAME[:ENTITY]",
        help="ID column; ENTITY (user, post, author; default post) picks the Phoenix constants",
    )
    p.add_argument("--sequential", type=int, default=0, metavar="N", help="also IDs 1..N")
    p.add_argument("--random", type=int, default=0, metavar="N", help="also N random int64 IDs")
    p.add_argument(
        "--buckets",
        type=_int_list,
        default=_int_list(DEFAULT_BUCKETS),
        help=f"buckets N per hash (default {DEFAULT_BUCKETS})",
    )
    p.add_argument("--hashes", type=_int_list, default=[1, 2, 3], help="k values (default 1,2,3)")
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
    p.add_argument("--seed", type=int, default=0, help="seed of the default scheme")
    p.add_argument("--out", default="runs/collisions", help="output folder (table, JSON, PNG)")
    p.set_defaults(func=cmd_collisions)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
