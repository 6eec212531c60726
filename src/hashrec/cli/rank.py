"""``hashrec rank``: score a request's candidates with a ranker checkpoint."""

from __future__ import annotations

import argparse
import json

from hashrec.cli import common

# Columns of the text table; --json has every action.
_SHOWN = ("favorite", "reply", "repost", "click", "dwell", "not_interested")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rank",
        help="score a request's candidates with a ranker checkpoint",
        description="Probabilities of every action for every candidate of a request: X's "
        "example_sequence.json format (user_id, history of post_id, author_id, actions) plus "
        "candidates [{post_id, author_id}]; optional product_surface, dwell_time, "
        "impression_ts and creation_ts. Checkpoints from import-phoenix batch the request as "
        "X's run_pipeline.py does.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="ranker checkpoint")
    p.add_argument("--request", required=True, metavar="FILE", help="request JSON")
    p.add_argument("--json", action="store_true", help="print JSON with every action")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hashrec.models.ranker import PhoenixRanker
    from hashrec.phoenix import PhoenixArtifacts
    from hashrec.training.checkpoint import load_checkpoint

    request = common.read_json_file(args.request)
    model, info = load_checkpoint(args.checkpoint)
    if not isinstance(model, PhoenixRanker):
        raise ValueError(f"{args.checkpoint}: holds a {type(model).__name__}, expected a ranker")
    if model.config.hash["post"].scheme == "identity":
        raise ValueError(f"{args.checkpoint}: a full-table checkpoint cannot hash raw IDs")
    if model.config.side.any:
        raise ValueError(f"{args.checkpoint}: this ranker was trained with side features, which "
                         "X's request format does not carry; serve it with hashrec serve "
                         "--ranker CKPT --data LOG (the log it was trained on)")  # fmt: skip
    model.eval()
    probs = PhoenixArtifacts(model, info.extra.get("phoenix_config")).rank(request)
    actions = list(model.config.actions)
    cands = request["candidates"]
    if args.json:
        rows = [
            {
                "post_id": c["post_id"],
                "author_id": c["author_id"],
                "probs": dict(zip(actions, map(float, p), strict=True)),
            }
            for c, p in zip(cands, probs, strict=True)
        ]
        print(json.dumps({"actions": actions, "candidates": rows}))
        return 0
    shown = [a for a in _SHOWN if a in actions] or actions[:6]
    idx = [actions.index(a) for a in shown]
    print(" ".join(f"{h:>20}" if h == "post_id" else f"{h[:14]:>14}" for h in ["post_id", *shown]))
    for c, p in zip(cands, probs, strict=True):
        print(f"{c['post_id']:>20} " + " ".join(f"{p[i]:>14.6f}" for i in idx))
    return 0
