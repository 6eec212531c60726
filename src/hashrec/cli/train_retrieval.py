"""``hashrec train-retrieval``: train the two-tower retriever, evaluate Recall@K on later days."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from hashrec.cli import common
from hashrec.files import write_json_atomic, write_text_atomic


def _names(text: str) -> tuple[str, ...]:
    names = common.names(text)
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated action names")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-retrieval", help="train the two-tower retriever and evaluate it",
                       description="Train the two-tower retriever on days up to --train-end "
                       "(sampled softmax, in-batch negatives, log-Q correction), then report "
                       "Recall@{10,50,100} and NDCG@10 of the posts each user engaged with on "
                       "--eval-start..--eval-end, against popularity.")  # fmt: skip
    common.add_data_options(p)
    p.add_argument("--train-end", type=common.date, default=20220502, help="last training day")
    p.add_argument("--out", default="runs/train-retrieval", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
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
    g.add_argument("--temperature", type=float, default=0.1,
                   help="initial (it is learned); 0.1 beat 0.05 and 0.2 on KuaiRand's validation "
                   "day")  # fmt: skip
    t = p.add_argument_group("training")
    t.add_argument("--positive-actions", type=_names, default=None,
                   help="actions that make an impression a positive (default: long_view if "
                   "the log has it, else its first action)")  # fmt: skip
    t.add_argument("--targets", type=_names, default=None,
                   help="actions that make an evaluation post a target, and that the popularity "
                   "prior and baseline count (default: the positive actions)")  # fmt: skip
    t.add_argument("--no-log-q", action="store_true", help="no popularity (log-Q) correction")
    t.add_argument("--epochs", type=int, default=2,
                   help="2: more overfit on KuaiRand's validation day (Recall@100 falls from "
                   "epoch 3)")  # fmt: skip
    t.add_argument("--batch-size", type=int, default=256, help="examples per step")
    t.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (dense)")
    t.add_argument("--table-lr", type=float, default=0.05, help="row-wise Adagrad (table)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--chunk-size", type=int, default=65_536, help="corpus chunk of the top-k")
    r = p.add_argument_group(
        "serving (stored in the checkpoint: the defaults of recommend and serve)",
        "What the retriever ranks and the popularity prior it adds, at request time.",
    )
    r.add_argument("--active-days", type=float, default=None, metavar="N",
                   help="corpus: only posts shown in the last N days before the request "
                   "(default: every post shown before it)")  # fmt: skip
    r.add_argument("--prior-weight", type=float, default=0.0, metavar="BETA",
                   help="add BETA * log(1 + engagements) to cosine / temperature (default 0: "
                   "none); the evaluation reports the retriever with and without it")  # fmt: skip
    r.add_argument("--prior-days", type=float, default=None, metavar="N",
                   help="count the prior's engagements over the last N days (default: all); "
                   "popularity counted this way is reported too")  # fmt: skip
    common.add_device_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from hashrec.data import RowHashes
    from hashrec.evaluation.experiment import data_fingerprint, hashed_config
    from hashrec.evaluation.retrieval import next_engagement_queries
    from hashrec.models.two_tower import TwoTowerConfig, TwoTowerRetriever
    from hashrec.nn.transformer import TransformerConfig
    from hashrec.retrieval.corpus import CorpusConfig
    from hashrec.retrieval.evaluate import evaluate_retriever
    from hashrec.training.loop import resolve_device
    from hashrec.training.retrieval import (
        PostLogQ,
        RetrievalTrainConfig,
        RetrievalTrainer,
        positive_rows,
        retrieval_requests,
    )
    from hashrec.training.runlock import RunLock
    from hashrec.training.trainer import set_seed

    if args.table_fraction <= 0:
        raise common.UsageError(f"--table-fraction must be > 0, got {args.table_fraction}")
    if args.history_len < 0 or args.chunk_size < 1:
        raise common.UsageError(
            f"need --history-len >= 0 and --chunk-size >= 1, got {args.history_len} and "
            f"{args.chunk_size}"
        )
    log = common.load_data(args)
    split = common.split(args, args.train_end)
    train, ev = split.masks(log)
    positives = args.positive_actions or (
        ("long_view",) if "long_view" in log.actions else (log.actions[0],)
    )
    targets = args.targets or positives
    for flag, names in (("--positive-actions", positives), ("--targets", targets)):
        unknown = [a for a in names if a not in log.actions]
        if unknown:
            raise common.UsageError(
                f"{flag} {','.join(unknown)} not in the log's actions {log.actions}"
            )
    try:
        tf = TransformerConfig(dim=args.dim, num_layers=args.layers, num_q_heads=args.heads,
                               num_kv_heads=args.kv_heads, widening_factor=2.0)  # fmt: skip
        cfg = TwoTowerConfig(
            hash=hashed_config(log, args.table_fraction, args.num_hashes, args.scheme),
            transformer=tf, actions=log.actions, init_temperature=args.temperature,
            min_temperature=min(0.01, args.temperature),
        )  # fmt: skip
        train_cfg = RetrievalTrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                         lr=args.lr, table_lr=args.table_lr, seed=args.seed,
                                         positive_actions=positives,
                                         log_q_correction=not args.no_log_q)  # fmt: skip
        corpus_cfg = CorpusConfig(args.active_days, args.prior_weight, args.prior_days)
    except ValueError as e:  # an option that makes no valid model: a usage error
        raise common.UsageError(str(e)) from e
    resolve_device(args.device)  # a device this machine lacks fails before the folder is made
    out = common.out_folder(args.out)
    set_seed(args.seed)
    pos = positive_rows(log, train, positives)
    requests = retrieval_requests(log, pos, args.history_len)
    if len(requests) == 0:
        raise ValueError(f"no training impression has any of {positives}")
    hashes = RowHashes(log, cfg.hash)
    model = TwoTowerRetriever(cfg)
    # one run per folder; resuming is decided (and refused on changed settings) before a write
    with RunLock(out, say=print):
        trainer = RetrievalTrainer(model, train_cfg, out, device=args.device)
        trainer.extra = {"split": asdict(split), "history_len": args.history_len,
                         "model": "two-tower", "data": data_fingerprint(log, train),
                         "targets": list(targets), "corpus": corpus_cfg.to_dict()}  # fmt: skip
        if args.resume and trainer.resume():
            print(f"resumed from {trainer.checkpoint_path} at step {trainer.state.global_step}")
        elif args.resume:
            print(f"note: --resume: {out} holds no checkpoint yet; training from the start")
        resolved = {"command": args.command, "data": args.data or "kuairand sample",
                    "split": asdict(split), "history_len": args.history_len,
                    "train": asdict(train_cfg), "model": cfg.to_dict(),
                    "targets": list(targets), "corpus": corpus_cfg.to_dict(),
                    "device": args.device}  # fmt: skip
        write_json_atomic(out / "config.json", resolved)
        print(f"training the two-tower retriever on {len(requests):,} positives "
              f"({', '.join(positives)}) ...", flush=True)  # fmt: skip
        state = trainer.fit(log, hashes, requests, PostLogQ.fit(log.post[pos]))
        print(f"{state.examples_per_s:,.0f} examples/s; temperature "
              f"{model.temperature.item():.4f}")  # fmt: skip

        queries = next_engagement_queries(log, ev, targets, args.history_len)
        new_users = int((~queries.warm).sum())
        queries = queries.take(np.flatnonzero(queries.warm))  # new users: cold start, not retrieval
        if len(queries) == 0:
            raise ValueError(
                "no user with a history engaged with an unseen post on the evaluation days"
            )
        report = evaluate_retriever(model, log, hashes, queries, train, targets,
                                    chunk_size=args.chunk_size, config=corpus_cfg)  # fmt: skip
        table = report.table()
        print()
        print(table)
        active = "" if args.active_days is None else f" shown in the last {args.active_days:g} days"
        print(f"{report.users:,} users with a history ({new_users:,} new users left out), corpus "
              f"{report.corpus_size:,} posts{active}; targets: {', '.join(targets)}; posts seen "
              "before the evaluation days excluded")  # fmt: skip
        write_json_atomic(out / "metrics.json", {"retrieval": report.metrics, "users": report.users,
                                                 "new_users_left_out": new_users,
                                                 "corpus_size": report.corpus_size,
                                                 "corpus": corpus_cfg.to_dict()})  # fmt: skip
        write_text_atomic(out / "results.md", table + "\n")
        print(f"wrote {out}/metrics.json, results.md, checkpoint.safetensors")
    return 0
