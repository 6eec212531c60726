"""``hashrec recommend``: retrieve from the whole corpus, rank with Phoenix, score, print."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hashrec.cli import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="recommend posts to users: retrieve -> rank -> score",
                       description="Retrieve the --retrieve-k best unseen posts of the corpus "
                       "(every post of --data) with the two-tower retriever, rank them with the "
                       "Phoenix ranker, apply the weighted scorer and author diversity, and print "
                       "the top --k with each action's probability.")  # fmt: skip
    p.add_argument("--retriever", help="two-tower checkpoint (train-retrieval)")
    p.add_argument("--ranker", nargs="+", metavar="CKPT",
                   help="ranker checkpoint (train); several (the seeds of one run) rank as one "
                   "ensemble, the mean of their logits")  # fmt: skip
    common.add_log_options(
        p, "KuaiRand folder, or a CSV/Parquet log with --schema: the corpus and the users' "
        "histories (default: the shipped KuaiRand sample)")  # fmt: skip
    who = p.add_mutually_exclusive_group()
    who.add_argument("--user", type=common.int_list, help="user ID(s), comma-separated")
    who.add_argument("--users-file", help="file with one user ID per line (batch mode)")
    p.add_argument("--k", type=int, default=20, help="posts per user")
    p.add_argument("--retrieve-k", type=int, default=100, help="candidates sent to the ranker")
    p.add_argument("--history-len", type=int, default=None,
                   help="history events per user (default: the retriever's)")  # fmt: skip
    p.add_argument("--time-ms", type=int, default=None,
                   help="when the feed is served, epoch ms: histories end before it and a "
                   "side-feature ranker sees the posts' ages then (default: the log's last "
                   "impression)")  # fmt: skip
    p.add_argument("--weights", help="JSON (file or string) of action -> scorer weight "
                   "(default: X's published weights, mapped onto the log's actions)")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=65_536, help="corpus chunk of the top-k")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_corpus_options(p)
    common.add_device_option(p)
    x = p.add_argument_group(
        "X's released Phoenix (run_pipeline.py)",
        "--phoenix ARTIFACTS --request FILE instead of --retriever/--ranker/--user: retrieve "
        "the --top-k-retrieval best posts of X's corpus with X's retrieval model, rank them with "
        "X's ranker, order them by run_pipeline.py's weighted score, print the top --k.",
    )
    x.add_argument("--phoenix", metavar="ARTIFACTS",
                   help="X's artifacts (ranker/, retrieval/) or import-phoenix --out")  # fmt: skip
    x.add_argument("--request", metavar="FILE", help="user sequence (example_sequence.json)")
    x.add_argument("--corpus", metavar="FILE",
                   help="corpus npz (default: ARTIFACTS/sports_corpus.npz)")  # fmt: skip
    x.add_argument("--top-k-retrieval", type=int, default=200, help="posts retrieved (200)")
    p.set_defaults(func=run)


def _id_offset(args: argparse.Namespace) -> int:
    """What the log adds to dataset IDs (KuaiRand: 1, so that ID 0 is not padding)."""
    from hashrec.data import KUAIRAND_SCHEMA, LogSchema

    if args.data is None or os.path.isdir(args.data):
        return KUAIRAND_SCHEMA.id_offset
    text = Path(args.schema).read_text() if os.path.exists(args.schema) else args.schema
    return LogSchema.from_dict(json.loads(text)).id_offset


_INT64 = (-(2**63), 2**63 - 1)


def _users(args: argparse.Namespace, offset: int) -> list[int]:
    """The users to serve, each checked to fit int64 with the log's ``offset`` added."""
    lo, hi = _INT64[0], _INT64[1] - offset

    def checked(u: int, where: str) -> int:
        if not lo <= u <= hi:
            raise common.UsageError(f"{where}: user ID {u} is outside {lo}..{hi} (int64, with "
                                    f"the log's ID offset {offset})")  # fmt: skip
        return u

    if args.user is not None:
        return [checked(u, "--user") for u in args.user]
    path = Path(args.users_file)
    if not path.is_file():
        raise FileNotFoundError(f"--users-file {path}: no such file")
    users = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                u = int(line.strip())
            except ValueError:
                raise ValueError(f"{path}:{n}: expected a user ID, got {line.strip()!r}") from None
            users.append(checked(u, f"{path}:{n}"))
    if not users:
        raise ValueError(f"{path}: no user IDs")
    return users


def run(args: argparse.Namespace) -> int:
    from hashrec.models.scoring import WeightedScorer
    from hashrec.serving.pipeline import RecommendPipeline, UserRequest, scoring_config
    from hashrec.training.trainer import resolve_device

    if args.k < 1:
        raise common.UsageError(f"--k must be >= 1, got {args.k}")
    if args.phoenix is not None:
        return _run_phoenix(args)
    if args.request is not None:
        raise common.UsageError("--request goes with --phoenix")
    if args.retriever is None or args.ranker is None or (args.user is None and not args.users_file):
        raise common.UsageError(
            "give --retriever, --ranker and --user or --users-file (or --phoenix and --request)"
        )
    if args.retrieve_k < 1:
        raise common.UsageError(f"--retrieve-k must be >= 1, got {args.retrieve_k}")
    if args.chunk_size < 1:
        raise common.UsageError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.history_len is not None and args.history_len < 0:
        raise common.UsageError(f"--history-len must be >= 0, got {args.history_len}")
    if args.time_ms is not None and args.time_ms < 0:
        raise common.UsageError(f"--time-ms must be >= 0, got {args.time_ms}")
    weights = common.weights_option(args.weights)
    off = _id_offset(args)
    users = _users(args, off)
    device = resolve_device(args.device)
    retriever, rinfo = common.load_checkpoint_of(args.retriever, "TwoTowerRetriever", device)
    ranker, info = common.load_rankers(args.ranker, device, "--ranker")
    # stdout: only the lists
    # the corpus, its activity window and the prior as they stood at --time-ms: nothing later
    log, corpus, corpus_cfg = common.load_corpus(args, retriever.config.actions, rinfo,
                                                 args.time_ms)  # fmt: skip
    store = common.side_store_for(ranker, info, log, f"--ranker {' '.join(args.ranker)}")
    if args.k > len(corpus):
        raise common.UsageError(f"--k {args.k} is larger than the corpus ({len(corpus)} posts)")
    scorer = None
    if weights is not None:
        acts = tuple(ranker.config.actions) + tuple(ranker.config.continuous_actions)
        try:
            scoring = scoring_config(acts, weights)
        except ValueError as e:
            raise common.UsageError(f"--weights {e}") from None
        scorer = WeightedScorer(scoring, ranker.config.actions, ranker.config.continuous_actions)
    history_len = args.history_len
    if history_len is None:
        history_len = int(rinfo.extra.get("history_len", 32))
    pipe = RecommendPipeline(retriever, ranker, corpus, scorer, args.retrieve_k, args.chunk_size,
                             history_len=max(1, history_len), side_store=store,
                             prior_weight=corpus_cfg.prior_weight)  # fmt: skip
    requests = [UserRequest.from_log(log, u + off, history_len, args.time_ms) for u in users]
    for r in requests:
        r.time_ms = int(log.time.max()) if args.time_ms is None else args.time_ms
    results = pipe.recommend_batch(requests, args.k)
    for res in results:
        res.user_id -= off
        if res.notice:
            print(f"hashrec recommend: notice: user {res.user_id}: {res.notice}", file=sys.stderr)
        res.post_ids = res.post_ids - off  # before ``items`` is first built
        res.author_ids = res.author_ids - off
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        for r in results:
            print(_table(r, pipe.actions))
    return 0


def _table(r, actions: tuple[str, ...]) -> str:
    head = f"user {r.user_id}" + (" (cold start)" if r.cold_start else "")
    cols = ["rank", "post", "author", "score", "retrieval", *actions]
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for i, it in enumerate(r.items, 1):
        rs = "-" if it.retrieval_score is None else f"{it.retrieval_score:.3f}"
        probs = " | ".join(f"{it.probs[a]:.3f}" for a in actions)
        lines.append(f"| {i} | {it.post_id} | {it.author_id} | {it.score:.4f} | {rs} | {probs} |")
    return "\n".join(lines) + "\n"


def _run_phoenix(args: argparse.Namespace) -> int:
    """X's run_pipeline.py on its released artifacts (``hashrec.phoenix``)."""
    from hashrec import phoenix

    if args.request is None:
        raise common.UsageError("--phoenix needs --request (a user sequence JSON)")
    if args.top_k_retrieval < 1:
        raise common.UsageError(f"--top-k-retrieval must be >= 1, got {args.top_k_retrieval}")
    sequence = common.read_json_file(args.request)
    corpus = Path(args.corpus) if args.corpus else Path(args.phoenix) / "sports_corpus.npz"
    post, author, reprs = phoenix.load_corpus(corpus)
    px = phoenix.load(args.phoenix)
    if px.ranker is None or px.retrieval is None:
        raise ValueError(f"{args.phoenix}: recommend needs both the ranker and the retrieval model")
    rec = px.recommend(sequence, post, author, reprs, args.top_k_retrieval)
    k = min(args.k, len(rec.post_ids))
    if args.json:
        rows = [
            {
                "post_id": int(rec.post_ids[i]),
                "author_id": int(rec.author_ids[i]),
                "score": float(rec.score[i]),
                "retrieval_score": float(rec.retrieval_score[i]),
            }
            for i in range(k)
        ]
        print(json.dumps({"user_id": sequence["user_id"], "ranked": rows}))
        return 0
    print(f"{'rank':<5} {'score':<8} {'ret':<8} post")
    for i in range(k):
        print(f"{i + 1:<5} {rec.score[i]:<8.4f} {rec.retrieval_score[i]:<8.4f} "
              f"https://x.com/a/status/{int(rec.post_ids[i])}")  # fmt: skip
    return 0
