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
from hashrec.files import write_json_atomic, write_text_atomic

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
    from hashrec.data.log import read_columns

    parsed = []
    for spec in specs:
        col, _, entity = spec.partition(":")
        entity = entity or "post"
        if entity not in ("user", "post", "author"):
            raise SystemExit(f"error: --column {spec}: entity must be user, post or author")
        parsed.append((col, entity))
    try:
        table = read_columns(str(path), [c for c, _ in parsed], kinds="iu")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --csv {e}") from e
    return {col: (table[col].astype(np.int64), entity) for col, entity in parsed}


def cmd_collisions(args: argparse.Namespace) -> int:
    from hashrec.analysis.collisions import format_table, plot_study, study

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
    if not id_sets:  # default: the video and author IDs of the shipped KuaiRand sample
        from hashrec.datasets import kuairand_sample_dir

        videos = os.path.join(kuairand_sample_dir(), "video_features_basic_sample.csv.gz")
        print(f"(no ID set given: using the KuaiRand sample's video and author IDs, {videos})")
        id_sets.update(_read_id_columns(Path(videos), ["video_id:post", "author_id:author"]))
    for s in args.schemes:
        if s not in ("default", "phoenix"):
            raise SystemExit(f"error: --schemes: unknown scheme {s!r}, expected default or phoenix")
    rows = []
    for name, (ids, entity) in id_sets.items():
        schemes = [s if s == "default" else f"phoenix-{entity}" for s in args.schemes]
        rows += study({name: ids}, args.buckets, args.hashes, schemes, args.layout, args.seed)
    table = format_table(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "collisions.json", [r.to_dict() for r in rows])
    write_text_atomic(out / "collisions.md", table + "\n")
    plot_study(rows, str(out / "collisions.png"))
    print(f"\nwrote {out / 'collisions.md'}, {out / 'collisions.json'}, {out / 'collisions.png'}")
    return 0


# ---- train / evaluate / demo ---------------------------------------------------------------


def _date(text: str) -> int:
    digits = text.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        raise argparse.ArgumentTypeError(f"expected a date like 2022-05-03, got {text!r}")
    return int(digits)


def _load_data(args: argparse.Namespace):
    from hashrec.data.log import LogSchema, load_kuairand, load_log
    from hashrec.datasets import kuairand_sample_dir

    path = args.data or kuairand_sample_dir()
    try:
        if os.path.isdir(path):
            return load_kuairand(path)
        if not args.schema:
            raise SystemExit(
                f"error: --data {path} is a file: give --schema (JSON file or string) mapping its "
                "columns, or a KuaiRand folder"
            )
        text = Path(args.schema).read_text() if os.path.exists(args.schema) else args.schema
        schema = LogSchema.from_dict(json.loads(text))
        return load_log(path, schema, authors=args.authors)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="KuaiRand folder, or a CSV/Parquet log with --schema "
                   "(default: the KuaiRand sample shipped with hashrec)")  # fmt: skip
    p.add_argument("--schema", help="JSON (file or string) mapping a generic log's columns")
    p.add_argument("--authors", help="table mapping post -> author, if the log lacks authors")
    p.add_argument("--eval-start", type=_date, default=20220503, help="first evaluation day")
    p.add_argument("--eval-end", type=_date, default=None, help="last evaluation day")


def _add_model_options(p: argparse.ArgumentParser) -> None:
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


def _specs(args, log):
    from hashrec.data.log import ExampleConfig
    from hashrec.evaluation.experiment import ModelSpec, hashed_config
    from hashrec.nn.transformer import TransformerConfig
    from hashrec.training.trainer import TrainConfig

    if not 0 < args.table_fraction:
        raise SystemExit(f"error: --table-fraction must be > 0, got {args.table_fraction}")
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
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    return spec, examples, train


def _experiment(args, log, split, out: Path, with_full_table: bool, resume: bool = False) -> dict:
    """Train the hashed ranker (and the full table), score baselines, write the run folder."""
    import time
    from dataclasses import asdict

    from hashrec.evaluation.experiment import (
        baseline_predictions,
        collision_free_spec,
        evaluate_predictions,
        format_results,
        plot_run,
        run_model,
    )

    t0 = time.perf_counter()
    spec, examples, train_cfg = _specs(args, log)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {"command": args.command, "data": args.data or "kuairand sample",
                "split": asdict(split), "examples": asdict(examples),
                "train": asdict(train_cfg), "hash": spec.hash_config.to_dict(),
                "transformer": asdict(spec.transformer)}  # fmt: skip
    write_json_atomic(out / "config.json", resolved)
    specs = [spec] + ([collision_free_spec(log, spec.transformer)] if with_full_table else [])
    preds, losses, info = {}, {}, {}
    rows = reqs = None
    for sp in specs:
        print(f"training {sp.name} ...", flush=True)
        sub = out if sp is spec else out / "full_table"
        r = run_model(log, split, sp, examples, train_cfg, sub, resume=resume and sp is spec)
        if rows is not None and not np.array_equal(rows, r["rows"]):
            raise RuntimeError("models were evaluated on different rows")
        rows, reqs = r["rows"], r["requests"]
        preds[sp.name], losses[sp.name] = r["probs"], r["state"].losses
        info[sp.name] = {"examples_per_s": r["state"].examples_per_s,
                         "train_examples": r["train_examples"],
                         "table_bytes": r["memory"].table_bytes,
                         "table_rows": r["memory"].rows}  # fmt: skip
    print("scoring baselines ...", flush=True)
    preds = {**baseline_predictions(log, split, rows), **preds}
    results = evaluate_predictions(log, rows, reqs, preds)
    table = format_results(results, log.actions)
    wall = time.perf_counter() - t0
    print()
    print(table)
    for name, i in info.items():
        print(
            f"{name}: {i['examples_per_s']:,.0f} training examples/s, "
            f"table {i['table_rows']:,} rows ({i['table_bytes'] / 2**20:.1f} MiB)"
        )
    print(
        f"evaluated on {len(rows):,} impressions of {len(np.unique(log.user[rows])):,} users; "
        f"wall time {wall:.0f} s"
    )
    write_json_atomic(
        out / "metrics.json",
        {"results": results, "models": info, "eval_impressions": len(rows), "wall_s": wall},
    )
    write_text_atomic(out / "results.md", table + "\n")
    plot_run(results, losses, log.actions, out / "results.png")
    print(f"wrote {out}/metrics.json, results.md, results.png, checkpoint.safetensors")
    return results


def _split(args, train_end: int):
    from hashrec.evaluation.experiment import Split

    try:
        return Split(train_end=train_end, eval_start=args.eval_start, eval_end=args.eval_end)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e


def cmd_train(args: argparse.Namespace) -> int:
    log = _load_data(args)
    _split(args, args.train_end).masks(log)  # fail before training if a split is empty
    _experiment(args, log, _split(args, args.train_end), Path(args.out), args.full_table,
                resume=args.resume)  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.data = args.schema = args.authors = None
    args.eval_start, args.eval_end = 20220503, 20220505
    print("hashrec demo: KuaiRand-Pure sample (Gao et al., CIKM 2022; CC BY-SA 4.0), "
          "train 2022-04-25..05-02, evaluate 05-03..05-05")  # fmt: skip
    log = _load_data(args)
    _experiment(args, log, _split(args, 20220502), Path(args.out), with_full_table=True)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hashrec.data.log import ExampleConfig, RowHashes, build_requests
    from hashrec.evaluation.experiment import (
        baseline_predictions,
        evaluate_predictions,
        format_results,
    )
    from hashrec.training.trainer import load_checkpoint, predict

    try:
        model, info = load_checkpoint(args.checkpoint)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    log = _load_data(args)
    if tuple(model.config.actions) != tuple(log.actions):
        raise SystemExit(f"error: the checkpoint predicts {model.config.actions}, the data has "
                         f"{log.actions}")  # fmt: skip
    extra = info["extra"]
    train_end = args.train_end or (extra.get("split") or {}).get("train_end")
    if train_end is None:
        raise SystemExit("error: give --train-end (the checkpoint does not record it)")
    split = _split(args, train_end)
    examples = ExampleConfig(**{**extra.get("examples", {}), "negatives_per_request": 0})
    _, ev = split.masks(log)
    if model.config.hash.entities[0].scheme == "identity":
        raise SystemExit("error: evaluate full-table checkpoints with the run that trained them")
    hashes = RowHashes(log, model.config.hash)
    rows, reqs, probs = predict(model, log, hashes, build_requests(log, ev, examples))
    preds = {**baseline_predictions(log, split, rows), extra.get("model", "ranker"): probs}
    results = evaluate_predictions(log, rows, reqs, preds)
    print(format_results(results, log.actions))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"results": results, "eval_impressions": len(rows),
                            "checkpoint": str(args.checkpoint)})  # fmt: skip
    print(f"wrote {out}")
    return 0


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
    p.add_argument("--csv", metavar="FILE", help="CSV or Parquet file holding ID columns "
                   "(default: the shipped KuaiRand sample's video and author IDs)")  # fmt: skip
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

    p = sub.add_parser("demo", help="train and evaluate on the shipped KuaiRand sample",
                       description="The whole story on the KuaiRand-Pure sample shipped with "
                       "hashrec: train the hashed ranker and a collision-free one, score the "
                       "popularity and logistic-regression baselines on the same split, print the "
                       "table, write metrics and plots.")  # fmt: skip
    p.add_argument("--out", default="runs/demo", help="run folder")
    _add_model_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a ranker on a log and evaluate it",
                       description="Train on days up to --train-end, evaluate on --eval-start.. "
                       "--eval-end against baselines computed on the same split.")  # fmt: skip
    _add_data_options(p)
    p.add_argument("--train-end", type=_date, default=20220502, help="last training day")
    p.add_argument("--out", default="runs/train", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--full-table", action="store_true",
                   help="also train the collision-free (one row per ID) model")  # fmt: skip
    _add_model_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint against baselines")
    p.add_argument("--checkpoint", required=True)
    _add_data_options(p)
    p.add_argument("--train-end", type=_date, default=None,
                   help="last day baselines learn from (default: the checkpoint's)")  # fmt: skip
    p.add_argument("--out", default="runs/evaluate/metrics.json", help="metrics JSON")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input met past parsing: say it, no trace
        parser.exit(2, f"hashrec {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
