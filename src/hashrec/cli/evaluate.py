"""``hashrec evaluate``: score a checkpoint on evaluation days against baselines."""

from __future__ import annotations

import argparse

from hashrec.cli import common
from hashrec.files import write_json_atomic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint against baselines")
    p.add_argument("--checkpoint", required=True)
    common.add_data_options(p)
    p.add_argument("--train-end", type=common.date, default=None,
                   help="last day baselines learn from (default: the checkpoint's)")  # fmt: skip
    p.add_argument("--out", default="runs/evaluate/metrics.json", help="metrics JSON")
    common.add_device_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hashrec.data import ExampleConfig, RowHashes, build_requests
    from hashrec.evaluation.experiment import (
        baseline_predictions,
        checkpoint_log,
        evaluate_predictions,
    )
    from hashrec.evaluation.report import format_results
    from hashrec.training.trainer import predict, resolve_device

    out = common.out_file(args.out)
    device = resolve_device(args.device)
    model, info = common.load_checkpoint_of(
        args.checkpoint, "PhoenixRanker", device, "--checkpoint"
    )
    log = common.load_data(args)
    if tuple(model.config.actions) != tuple(log.actions):
        raise ValueError(f"the checkpoint predicts {model.config.actions}, the data has "
                         f"{log.actions}")  # fmt: skip
    extra = info.extra
    recorded = extra.get("split") or {}
    trained_to = recorded.get("train_end") if isinstance(recorded, dict) else None
    if not (isinstance(recorded, dict) and (trained_to is None or isinstance(trained_to, int))):
        raise ValueError(f"--checkpoint {args.checkpoint}: its recorded split {recorded!r} has "
                         "no yyyymmdd train_end")  # fmt: skip
    train_end = args.train_end or trained_to
    if train_end is None:
        raise common.UsageError("give --train-end (the checkpoint does not record it)")
    if trained_to is not None and train_end < trained_to:
        raise common.UsageError(
            f"--train-end {train_end} is before the checkpoint's last training day {trained_to}: "
            "the model would be scored on days it trained on"
        )
    split = common.split(args, train_end)
    examples = ExampleConfig(**{**extra.get("examples", {}), "negatives_per_request": 0})
    train, ev = split.masks(log)
    try:  # standardised as in training, the same time-respecting rate encodings
        log = checkpoint_log(log, extra, train)
    except ValueError as e:
        raise ValueError(
            f"--checkpoint {args.checkpoint}: {e}; give --data the log it was trained on"
        ) from None
    if model.config.hash.entities[0].scheme == "identity":
        raise ValueError("evaluate full-table checkpoints with the run that trained them")
    hashes = RowHashes(log, model.config.hash)
    pred = predict(model, log, hashes, build_requests(log, ev, examples))
    preds = {
        **baseline_predictions(log, split, pred.rows),
        extra.get("model", "ranker"): pred.probs,
    }
    results = evaluate_predictions(log, pred.rows, pred.requests, preds)
    positives = dict(zip(log.actions, log.labels[pred.rows].sum(0).tolist(), strict=True))
    print(format_results(results, log.actions, positives))
    write_json_atomic(out, {"results": results, "eval_impressions": len(pred.rows),
                            "checkpoint": str(args.checkpoint)})  # fmt: skip
    print(f"wrote {out}")
    return 0
