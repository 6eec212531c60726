"""Retrieval on the evaluation days: popularity, the two-tower retriever, the ranker scoring the
whole corpus, and retrieve-then-rank, side by side on the same users.

For every user with an impression before the evaluation days and an engaged (positive action)
post on them that they had not seen before: the query is their history up to the first
evaluation day, every post they saw before it is excluded, the targets are those engaged posts.
Reported: Recall@{10, 50, 100} and NDCG@10 of the targets, the ranker's candidates per user and
the wall time per user of each method (same machine, same run); a plot of recall against K.

    flock /tmp/hashrec-heavy.lock python benchmarks/eval_retrieval.py \\
        --data ../shared/data/kuairand-pure --ranker runs/ranker/checkpoint.safetensors \\
        --retriever runs/retriever/checkpoint.safetensors --users 1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from hashrec.data import RowHashes, load_kuairand
from hashrec.evaluation.retrieval import next_engagement_queries, popularity_ranking
from hashrec.files import write_json_atomic, write_text_atomic
from hashrec.models.scoring import ScoringConfig, WeightedScorer
from hashrec.retrieval.evaluate import metrics_of, two_tower_ranking
from hashrec.serving.pipeline import Corpus, RecommendPipeline, UserRequest
from hashrec.training.checkpoint import load_checkpoint

KS = (10, 50, 100)
CURVE_KS = (1, 2, 5, 10, 20, 50, 100, 200)


def ranker_over_corpus(pipe: RecommendPipeline, requests, k: int, batch: int) -> np.ndarray:
    """The ranker scores every unseen corpus post, then the scorer and author diversity."""
    corpus = pipe.corpus
    out = np.full((len(requests), k), -1, np.int64)
    everything = np.arange(len(corpus))
    for lo in range(0, len(requests), batch):
        part = requests[lo : lo + batch]
        cands = []
        for r in part:
            keep = np.setdiff1d(everything, corpus.positions(r.seen_post_ids))
            cands.append(np.r_[keep, np.full(len(corpus) - len(keep), -1)])
        cands = np.stack(cands)
        _, scores = pipe.rank(part, cands)
        for i in range(len(part)):
            valid = cands[i] >= 0
            order, _ = pipe.scorer.rank(
                torch.from_numpy(scores[i]),
                torch.from_numpy(corpus.author_ids[np.maximum(cands[i], 0)]),
                mask=torch.from_numpy(valid),
            )
            top = cands[i][order[:k].numpy()]
            out[lo + i, : len(top)] = corpus.post_ids[top]
    return out


def retrieve_then_rank(pipe: RecommendPipeline, requests, k: int, batch: int) -> np.ndarray:
    out = np.full((len(requests), k), -1, np.int64)
    for lo in range(0, len(requests), batch):
        for i, res in enumerate(pipe.recommend_batch(requests[lo : lo + batch], k, batch)):
            ids = [it.post_id for it in res.items]
            out[lo + i, : len(ids)] = ids
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def plot(curves: dict[str, dict[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, c in curves.items():
        ks = sorted(c)
        ax.plot(ks, [c[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("K (posts retrieved)")
    ax.set_ylabel("Recall@K of the posts engaged with next")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="KuaiRand-Pure folder")
    ap.add_argument("--ranker", required=True)
    ap.add_argument("--retriever", required=True)
    ap.add_argument("--eval-start", type=int, default=20220503)
    ap.add_argument("--eval-end", type=int, default=20220505)
    ap.add_argument("--train-end", type=int, default=20220502)
    ap.add_argument("--users", type=int, default=1000, help="users sampled for the ranker runs")
    ap.add_argument("--retrieve-k", type=str, default="100,300", help="retrieve-then-rank K")
    ap.add_argument("--batch", type=int, default=8, help="users per ranker batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", help='scorer weights as JSON, e.g. {"long_view": 1} (default: '
                    "X's published weights mapped onto the log's actions)")  # fmt: skip
    ap.add_argument("--out", default="runs/eval_retrieval")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)

    retriever, rinfo = load_checkpoint(args.retriever)
    ranker, _ = load_checkpoint(args.ranker)
    positives = tuple(rinfo.extra["train"]["positive_actions"])
    history_len = int(rinfo.extra["history_len"])
    log = load_kuairand(args.data)
    train = log.days(None, args.train_end)
    ev = log.days(args.eval_start, args.eval_end)
    queries = next_engagement_queries(log, ev, positives, history_len)
    n_all = len(queries)
    queries = queries.take(np.flatnonzero(queries.warm))
    corpus = Corpus.from_log(log)
    print(
        f"corpus {len(corpus):,} posts; {n_all:,} users engaged ({','.join(positives)}) with an "
        f"unseen post on {args.eval_start}..{args.eval_end}; {len(queries):,} of them have a "
        f"history before (evaluated), {n_all - len(queries):,} are new (cold start, left out)"
    )

    # 1. popularity and the two-tower retriever on every evaluated user
    kmax = max(CURVE_KS)
    hashes = RowHashes(log, retriever.config.hash)
    pop_all = popularity_ranking(log, train, positives, queries.seen, kmax)
    (tt_all, _), tt_s = timed(
        lambda: two_tower_ranking(retriever, log, hashes, queries, corpus, kmax)
    )
    full = {
        "popularity": metrics_of(pop_all, queries.targets, KS),
        "two-tower": metrics_of(tt_all, queries.targets, KS),
    }

    # 2. a sample of them through the ranker: over the whole corpus, and retrieve-then-rank
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(len(queries), size=min(args.users, len(queries)), replace=False))
    sample = queries.take(pick)
    start = int(log.time[ev].min())
    requests = [UserRequest.from_log(log, int(u), history_len, before_time=start)
                for u in sample.users]  # fmt: skip
    for r, s in zip(requests, sample.seen, strict=True):
        assert np.array_equal(r.seen_post_ids, s)
    U = len(requests)
    rows, curves = {}, {}
    unseen = np.mean([len(corpus) - len(corpus.positions(s)) for s in sample.seen])

    def add(name, ranked, seconds, ranker_cands):
        rows[name] = {**metrics_of(ranked, sample.targets, [k for k in KS if k <= ranked.shape[1]]),
                      "ranker candidates / user": ranker_cands,
                      "ms / user": 1000 * seconds / U}  # fmt: skip
        curves[name] = {
            k: metrics_of(ranked, sample.targets, [k])[f"recall@{k}"]
            for k in CURVE_KS
            if k <= ranked.shape[1]
        }
        print(f"  {name}: {json.dumps({k: round(v, 4) for k, v in rows[name].items()})}",
              flush=True)  # fmt: skip

    scorer = None
    if args.weights:
        acts, cont = ranker.config.actions, ranker.config.continuous_actions
        scorer = WeightedScorer(ScoringConfig(weights=json.loads(args.weights)), acts, cont)
        print(f"scorer weights {args.weights}")
    pipe = RecommendPipeline(retriever, ranker, corpus, scorer, retrieve_k=100)
    add("popularity", pop_all[pick], 0.0, 0)
    tt, s = timed(lambda: two_tower_ranking(retriever, log, hashes, sample, corpus, kmax)[0])
    add("two-tower", tt, s, 0)
    print(f"ranker over the whole corpus for {U} users ...", flush=True)
    rc, s = timed(lambda: ranker_over_corpus(pipe, requests, kmax, args.batch))
    add("ranker over corpus", rc, s, float(unseen))
    for rk in (int(x) for x in args.retrieve_k.split(",")):
        pipe = RecommendPipeline(retriever, ranker, corpus, scorer, retrieve_k=rk)
        rr, s = timed(lambda p=pipe, k=rk: retrieve_then_rank(p, requests, k, 64))
        add(f"retrieve {rk} then rank", rr, s, rk)

    names = [f"recall@{k}" for k in KS] + ["ndcg@10", "ranker candidates / user", "ms / user"]
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for m, v in rows.items():
        cells = [f"{v[n]:.4f}" if n in v and n.startswith(("recall", "ndcg")) else
                 (f"{v[n]:,.0f}" if n.startswith("ranker") else
                  (f"{v[n]:.2f}" if n in v else "-")) for n in names]  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    full_lines = ["| method | " + " | ".join(full["popularity"]) + " |",
                  "|---|" + "---:|" * len(full["popularity"])]  # fmt: skip
    for m, v in full.items():
        full_lines.append(f"| {m} | " + " | ".join(f"{x:.4f}" for x in v.values()) + " |")
    full_table = "\n".join(full_lines)
    base, rc_ndcg = rows["popularity"], rows["ranker over corpus"]["ndcg@10"]
    print()
    print(f"All {len(queries):,} evaluated users (two-tower: {1000 * tt_s / len(queries):.2f} "
          "ms / user):")  # fmt: skip
    print(full_table)
    print()
    print(f"Sample of {U} users (seed {args.seed}), ranker runs included:")
    print(table)
    print()
    ratio = full["two-tower"]["recall@100"] / full["popularity"]["recall@100"]
    print(
        f"two-tower Recall@100 / popularity: {ratio:.2f}x (all users; target >= 1.5x); "
        f"sample: {rows['two-tower']['recall@100'] / base['recall@100']:.2f}x"
    )
    for m in rows:
        if m.startswith("retrieve"):
            rel = rows[m]["ndcg@10"] / rc_ndcg - 1
            cost = rows[m]["ms / user"] / rows["ranker over corpus"]["ms / user"]
            print(
                f"{m}: NDCG@10 {rel:+.1%} vs ranker over corpus (target within 2%), "
                f"{cost:.3f}x its wall time, "
                f"{rows[m]['ranker candidates / user'] / unseen:.3f}x its ranker candidates"
            )
    title = (f"KuaiRand-Pure, {args.eval_start}..{args.eval_end}: {U} users, corpus "
             f"{len(corpus):,}")  # fmt: skip
    plot(curves, out / "recall_at_k.png", title)
    write_json_atomic(out / "metrics.json", {"all_users": full, "sample": rows,
                                             "curves": curves, "users": len(queries),
                                             "sample_users": U, "corpus": len(corpus)})  # fmt: skip
    write_text_atomic(out / "results.md", full_table + "\n\n" + table + "\n")
    print(f"wrote {out}/metrics.json, results.md, recall_at_k.png")


if __name__ == "__main__":
    main()
