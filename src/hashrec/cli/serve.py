"""``hashrec serve``: the ranker (and optionally a retriever) behind an HTTP endpoint."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from hashrec.cli.common import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a ranker checkpoint over HTTP (POST /rank)",
                       description="Serve a ranker checkpoint over HTTP with FastAPI + uvicorn "
                       "(pip install 'hashrec[serve]'): POST /rank, GET /healthz, GET /metrics, "
                       "/openapi.json, /docs. Only safetensors checkpoints load.")  # fmt: skip
    p.add_argument("--ranker", required=True, help="ranker checkpoint (.safetensors)")
    p.add_argument("--retriever", help="retriever checkpoint: enables POST /recommend")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--weights", help="scoring weights per action, JSON (file or string); "
                   "default: X's home-mixer weights")  # fmt: skip
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-history",
        type=int,
        default=None,
        help="history events per request (default: the checkpoint's history length)",
    )
    g.add_argument("--max-candidates", type=int, default=1000)
    g.add_argument("--max-body-bytes", type=int, default=1 << 20)
    g.add_argument("--max-id", type=int, default=2**63 - 1, help="largest raw ID accepted")
    b = p.add_argument_group("batching")
    b.add_argument("--max-batch", type=int, default=32, help="requests per model call (1: off)")
    b.add_argument(
        "--max-wait-ms",
        type=float,
        default=2.0,
        help="longest a request waits for others to join its batch",
    )
    b.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 429")
    b.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: one per core); the dispatcher sets it",
    )
    b.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown")  # fmt: skip
    p.set_defaults(func=run)


def _weights(text: str | None):
    from hashrec.models.scoring import ScoringConfig

    if text is None:
        return ScoringConfig()
    raw = Path(text).read_text() if os.path.exists(text) else text
    try:
        weights = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UsageError(f"--weights is not JSON ({e})") from None
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) for k, v in weights.items()
    ):
        raise UsageError("--weights must map action names to numbers")
    return ScoringConfig(weights={k: float(v) for k, v in weights.items()})


def build(args: argparse.Namespace):
    """The app for ``args`` (checkpoint loaded, limits and batching set)."""
    try:
        from hashrec.serving.app import ServeConfig, create_app
        from hashrec.serving.batcher import BatchConfig
        from hashrec.serving.schemas import Limits
    except ImportError as e:
        raise RuntimeError(
            f"hashrec serve needs the serve extra: pip install 'hashrec[serve]' ({e})"
        ) from None
    from hashrec.models.ranker import PhoenixRanker
    from hashrec.serving.rank import RequestRanker
    from hashrec.training.checkpoint import load_checkpoint

    try:
        limits = Limits(args.max_history, args.max_candidates, args.max_body_bytes, args.max_id)
        batching = BatchConfig(args.max_batch, args.max_wait_ms / 1000.0, args.max_queue)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.retriever is not None:
        raise RuntimeError(
            "--retriever: this build has no retrieve -> rank pipeline yet "
            "(hashrec.serving.pipeline.recommend); serve the ranker alone"
        )
    model, info = load_checkpoint(args.ranker)  # safetensors only: never unpickles
    if not isinstance(model, PhoenixRanker):
        raise ValueError(f"--ranker {args.ranker} holds a {info.model_class}, not a PhoenixRanker")
    trained = (info.extra.get("examples") or {}).get("history_len", 32)
    history_len = max(trained, args.max_history or 0)
    ranker = RequestRanker(model, history_len=history_len, scoring=_weights(args.weights))
    return create_app(ranker, ServeConfig(limits, batching))


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    app = build(args)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=args.graceful_timeout)  # fmt: skip
    return 0
