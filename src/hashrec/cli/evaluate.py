"""``hashrec evaluate``: score checkpoints on evaluation days against baselines."""

from __future__ import annotations

import argparse

from hashrec.cli import common
from hashrec.files import write_json_atomic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate checkpoints (and their ensemble) against baselines"
    )
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="PATH",
                   help="a ranker checkpoint; several (e.g. the seeds of one run) are each "
                   "scored and also as an ensemble (the mean of their logits)")  # fmt: skip
    common.add_data_options(p)
    p.add_argument("--train-end", type=common.date, default=None,
                   help="last day baselines learn from (default: the one the checkpoints "
                   "record; required when they record different days)")  # fmt: skip
    p.add_argument("--out", default="runs/evaluate/metrics.json", help="metrics JSON")
    common.add_device_option(p)
    p.set_defaults(func=run)


def _recorded_train_end(path: str, extra: dict) -> int | None:
    recorded = extra.get("split") or {}
    trained_to = recorded.get("train_end") if isinstance(recorded, dict) else None
    if not (isinstance(recorded, dict) and (trained_to is None or isinstance(trained_to, int))):
        raise ValueError(f"--checkpoint {path}: its recorded split {recorded!r} has "
                         "no yyyymmdd train_end")  # fmt: skip
    return trained_to


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from hashrec.data import ExampleConfig, RowHashes, build_requests
    from hashrec.evaluation.experiment import (
        baseline_predictions,
        checkpoint_log,
        ensemble_probs,
        evaluate_predictions,
    )
    from hashrec.evaluation.report import format_results
    from hashrec.training.trainer import predict, resolve_device

    out = common.out_file(args.out)
    device = resolve_device(args.device)
    paths = list(args.checkpoint)
    common.refuse_repeated_paths(paths, "--checkpoint")
    # (path, model, info) of each checkpoint
    loaded = [(p, *common.load_checkpoint_of(p, "PhoenixRanker", device, "--checkpoint"))
              for p in paths]  # fmt: skip
    raw = common.load_data(args)
    trained = {p: _recorded_train_end(p, info.extra) for p, _, info in loaded}
    for p, model, _ in loaded:
        if tuple(model.config.actions) != tuple(raw.actions):
            raise ValueError(f"--checkpoint {p} predicts {model.config.actions}, the data has "
                             f"{raw.actions}")  # fmt: skip
        if model.config.hash.entities[0].scheme == "identity":
            raise ValueError("evaluate full-table checkpoints with the run that trained them")
    known = sorted({t for t in trained.values() if t is not None})
    if args.train_end is None and len(known) > 1:
        raise common.UsageError(
            f"the checkpoints record different last training days {known}: give --train-end "
            f"(at least {known[-1]}) for the baselines and the evaluation days to follow"
        )
    train_end = args.train_end or (known[0] if known else None)
    if train_end is None:
        which = "the checkpoint does not" if len(paths) == 1 else "none of the checkpoints"
        raise common.UsageError(f"give --train-end ({which} record it)")
    for p, t in trained.items():
        if t is not None and train_end < t:
            which = f" (--checkpoint {p})" if len(paths) > 1 else ""
            raise common.UsageError(
                f"--train-end {train_end} is before the checkpoint's last training day {t}"
                f"{which}: the model would be scored on days it trained on"
            )
    split = common.split(args, train_end)
    train, ev = split.masks(raw)
    preds, rows, reqs, log = {}, None, None, None
    for i, (p, model, info) in enumerate(loaded):
        extra = info.extra
        examples = ExampleConfig(**{**extra.get("examples", {}), "negatives_per_request": 0})
        try:  # standardised as in training, the same time-respecting rate encodings
            mlog = checkpoint_log(raw, extra, train)
        except ValueError as e:
            raise ValueError(
                f"--checkpoint {p}: {e}; give --data the log it was trained on"
            ) from None
        pred = predict(
            model, mlog, RowHashes(mlog, model.config.hash), build_requests(mlog, ev, examples)
        )
        if rows is None:
            rows, reqs, log = pred.rows, pred.requests, mlog
        elif not (np.array_equal(rows, pred.rows) and np.array_equal(reqs, pred.requests)):
            raise ValueError(
                f"--checkpoint {p} scores other impressions than --checkpoint {paths[0]} "
                f"({len(pred.rows):,} rows in {len(np.unique(pred.requests)):,} requests, "
                f"expected {len(rows):,} in {len(np.unique(reqs)):,}; trained with another "
                "--max-candidates?): they cannot be compared or combined"
            )
        name = extra.get("model", "ranker")
        preds[name if len(paths) == 1 else f"{name}, checkpoint {i + 1}"] = pred.probs
    assert rows is not None and reqs is not None and log is not None
    if len(paths) > 1:
        preds[f"ensemble of the {len(paths)} checkpoints"] = ensemble_probs(list(preds.values()))
    preds = {**baseline_predictions(log, split, rows), **preds}
    results = evaluate_predictions(log, rows, reqs, preds)
    positives = dict(zip(log.actions, log.labels[rows].sum(0).tolist(), strict=True))
    print(format_results(results, log.actions, positives))
    record = {"results": results, "eval_impressions": len(rows), "checkpoints": paths}
    if len(paths) == 1:  # as before several were taken
        record["checkpoint"] = paths[0]
    write_json_atomic(out, record)
    print(f"wrote {out}")
    return 0
