"""``hashrec serve``: the ranker (and optionally a retriever) behind an HTTP endpoint."""

from __future__ import annotations

import argparse

from hashrec.cli import common
from hashrec.cli.common import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a ranker checkpoint over HTTP (POST /rank)",
                       description="Serve a ranker checkpoint over HTTP with FastAPI + uvicorn "
                       "(pip install 'hashrec[serve]'): POST /rank, GET /healthz, GET /metrics, "
                       "/openapi.json, /docs; with --retriever also POST /recommend over the "
                       "corpus of --data (retrieve -> rank -> score). Only safetensors "
                       "checkpoints load.")  # fmt: skip
    p.add_argument("--ranker", required=True, nargs="+", metavar="CKPT",
                   help="ranker checkpoint (.safetensors); several (the seeds of one run) are "
                   "served as one ensemble, the mean of their logits")  # fmt: skip
    p.add_argument("--retriever", help="two-tower checkpoint (train-retrieval): enables "
                   "POST /recommend over the corpus of --data")  # fmt: skip
    d = p.add_argument_group(
        "data", "the log the models were trained on: /recommend's corpus (with --retriever) and "
        "the side features' store (a ranker trained with side features needs it)")  # fmt: skip
    common.add_log_options(
        d, "KuaiRand folder (with its video and user feature tables), or a CSV/Parquet log with "
        "--schema: every post in it is the corpus, its users are the known users, its side "
        "tables give the users' and posts' side features (default with --retriever: the "
        "shipped KuaiRand sample)")  # fmt: skip
    r = p.add_argument_group("recommend (with --retriever)")
    r.add_argument("--retrieve-k", type=int, default=100, help="candidates sent to the ranker")
    r.add_argument("--max-k", type=int, default=100, help="largest k a request may ask for")
    r.add_argument("--max-exclude", type=int, default=10_000,
                   help="exclude_post_ids per request")  # fmt: skip
    common.add_device_option(p, threads=False)  # (--threads is in the batching group)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--weights", help="scoring weights per action, JSON (file or string), on top "
                   "of the default: X's home-mixer weights mapped onto the model's actions "
                   "(like -> favorite, ...)")  # fmt: skip
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
    from hashrec.serving.pipeline import RecommendPipeline, scoring_config
    from hashrec.serving.rank import RequestRanker

    try:
        limits = Limits(args.max_history, args.max_candidates, args.max_body_bytes, args.max_id,
                        args.max_k, args.max_exclude)  # fmt: skip
        batching = BatchConfig(args.max_batch, args.max_wait_ms / 1000.0, args.max_queue)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.retrieve_k < 1:
        raise UsageError(f"--retrieve-k must be >= 1, got {args.retrieve_k}")
    weights = common.weights_option(args.weights)
    from hashrec.training.loop import resolve_device

    device = resolve_device(args.device)  # before any loading: a bad --device costs nothing
    # safetensors only: never unpickles
    model, info = common.load_rankers(args.ranker, device, "--ranker")
    named = f"--ranker {' '.join(args.ranker)}"
    side = model.config.side.any
    if args.retriever is None and not side:
        for flag in ("data", "schema", "authors", "users"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} gives /recommend's corpus (it needs --retriever) and "
                                 "the side features' store (this ranker takes none)")  # fmt: skip
    if side and args.data is None:
        raise UsageError(f"{named} was trained with side features: give --data, "
                         "the log it was trained on with its side tables (the users' and posts' "
                         "features are looked up there)")  # fmt: skip
    acts = tuple(model.config.actions) + tuple(model.config.continuous_actions)
    try:
        scoring = scoring_config(acts, weights)
    except ValueError as e:
        raise UsageError(f"--weights {e}") from None
    trained = (info.extra.get("examples") or {}).get("history_len", 32)
    history_len = max(trained, args.max_history or 0)
    retriever = log = None
    if args.retriever is not None:
        retriever, rinfo = common.load_checkpoint_of(args.retriever, "TwoTowerRetriever",
                                                     device, "--retriever")  # fmt: skip
        # the corpus window and popularity prior the retriever was trained with
        log, corpus, corpus_cfg = common.load_corpus(args, retriever.config.actions, rinfo)
    elif side:
        log = common.load_log_quietly(args)
    store = common.side_store_for(model, info, log, named) if side else None
    ranker = RequestRanker(model, history_len=history_len, scoring=scoring, side_store=store)
    pipeline = known_users = None
    if retriever is not None:
        pipeline = RecommendPipeline(retriever, model, corpus, ranker.scorer, args.retrieve_k,
                                     history_len=max(1, history_len), side_store=store,
                                     prior_weight=corpus_cfg.prior_weight)  # fmt: skip
        known_users = log.user
    return create_app(ranker, ServeConfig(limits, batching), pipeline, known_users)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    app = build(args)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=args.graceful_timeout)  # fmt: skip
    return 0
