"""Retrieval on the evaluation days: popularity, the two-tower retriever (with and without its
popularity prior), the ranker scoring the whole corpus, and retrieve-then-rank, side by side on
the same users and the same corpus.

For every user with an impression before the evaluation days and an engaged (positive action)
post on them that they had not seen before: the query is their history up to the first
evaluation impression, every post they saw before it is excluded, the targets are those engaged
posts. The corpus is the posts shown before that time (``--active-days``: only those shown in the
last N days). Reported: Recall@{10, 50, 100} and NDCG@10 of the targets on every evaluated user,
mean ± std over the retriever checkpoints given (one per seed), popularity counted on every
training day and on the prior's window beside them; then, on a sample of users and with the
first checkpoint, the ranker over the whole corpus and retrieve-then-rank with their ranker
candidates and wall time per user. Plot: recall against K.

``--sweep-prior-weights`` (with ``--sweep-prior-days`` / ``--sweep-active-days``) evaluates
every combination instead of one setting: run it on a validation split (checkpoints trained
with an earlier ``--train-end``) to choose the setting, never on the reported days.

    # choose the setting on the validation split (train ..05-01, evaluate 05-02)
    python benchmarks/eval_retrieval.py --data ../shared/data/kuairand-pure \\
        --retriever runs/val_s0/checkpoint.safetensors,runs/val_s1/checkpoint.safetensors \\
        --train-end 20220501 --eval-start 20220502 --eval-end 20220502 \\
        --sweep-prior-weights 0,0.5,1,2 --sweep-prior-days 1,all --sweep-active-days 1,all
    # report it (train ..05-02, evaluate 05-03..05-05), 3 seeds, with the ranker
    python benchmarks/eval_retrieval.py --data ../shared/data/kuairand-pure \\
        --retriever runs/s0/checkpoint.safetensors,runs/s1/...,runs/s2/... \\
        --ranker runs/ranker/checkpoint.safetensors --active-days 1 --prior-days 1 \\
        --prior-weight 1 --users 300
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from hashrec.data import RowHashes, load_kuairand
from hashrec.data.features import sorted_lookup
from hashrec.evaluation.retrieval import count_ranking, next_engagement_queries
from hashrec.files import write_json_atomic, write_text_atomic
from hashrec.models.scoring import ScoringConfig, WeightedScorer
from hashrec.retrieval.corpus import Corpus, CorpusConfig
from hashrec.retrieval.evaluate import metrics_of, two_tower_ranking
from hashrec.serving.pipeline import RecommendPipeline, UserRequest
from hashrec.training.checkpoint import load_checkpoint

KS = (10, 50, 100)
ORACLE = "oracle one list (the evaluation days' targets; a ceiling, not a method)"
CURVE_KS = (1, 2, 5, 10, 20, 50, 100, 200)
METRICS = [f"recall@{k}" for k in KS] + ["ndcg@10"]


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
            out[lo + i, : len(res.post_ids)] = res.post_ids
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def curve(ranked: np.ndarray, targets) -> dict[int, float]:
    return {k: metrics_of(ranked, targets, [k])[f"recall@{k}"] for k in CURVE_KS
            if k <= ranked.shape[1]}  # fmt: skip


def plot(panels: list[tuple[str, dict[str, list[dict[int, float]]]]], path: Path) -> None:
    """One panel per (title, method -> curves over seeds): mean line, min..max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    for ax, (title, methods) in zip(axes[0], panels, strict=True):
        for name, runs in methods.items():
            ks = sorted(runs[0])
            v = np.array([[c[k] for k in ks] for c in runs])
            (line,) = ax.plot(ks, v.mean(0), marker="o", ms=3, label=name)
            if len(runs) > 1:
                ax.fill_between(ks, v.min(0), v.max(0), color=line.get_color(), alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("K (posts retrieved)")
        ax.set_ylabel("Recall@K of the posts engaged with next")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recency_of_targets(log, queries, start: int) -> str:
    """Where the targets are: the share of (user, target) pairs on posts shown in the last N
    days before the request time, and those posts' share of every post shown before it."""
    from hashrec.retrieval.corpus import DAY_MS

    targets = np.concatenate(queries.targets)
    shown = np.unique(log.post[log.time < start])
    lines = ["| posts shown in the last | posts | of all shown before | targets on them |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for days in (1, 2, 3, None):
        m = log.time < start
        if days is not None:
            m &= log.time >= start - days * DAY_MS
        posts = np.unique(log.post[m])
        lines.append(f"| {days or 'all'} days | {len(posts):,} | {len(posts) / len(shown):.1%} | "
                     f"{np.isin(targets, posts).mean():.1%} |")  # fmt: skip
    return "\n".join(lines)


def days_or_all(text: str) -> float | None:
    return None if text.strip().lower() in ("all", "none") else float(text)


def mean_std(runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    return {m: (float(np.mean([r[m] for r in runs])), float(np.std([r[m] for r in runs])))
            for m in runs[0]}  # fmt: skip


def fmt(ms: tuple[float, float], n: int) -> str:
    return f"{ms[0]:.4f}" if n == 1 else f"{ms[0]:.4f} ± {ms[1]:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="KuaiRand-Pure folder")
    ap.add_argument("--retriever", required=True,
                    help="two-tower checkpoint(s), comma-separated (one per seed)")  # fmt: skip
    ap.add_argument("--ranker", help="ranker checkpoint: adds the ranker rows (sampled users)")
    ap.add_argument("--eval-start", type=int, default=20220503)
    ap.add_argument("--eval-end", type=int, default=20220505)
    ap.add_argument("--train-end", type=int, default=20220502)
    ap.add_argument("--active-days", type=days_or_all, default=None,
                    help="corpus: posts shown in the last N days ('all', the default)")  # fmt: skip
    ap.add_argument("--prior-weight", type=float, default=0.0, help="beta of the prior")
    ap.add_argument("--prior-days", type=days_or_all, default=None,
                    help="the prior's (and windowed popularity's) days ('all', the "
                    "default)")  # fmt: skip
    ap.add_argument("--targets", help="actions that make an evaluation post a target, comma-"
                    "separated (default: the retriever's, train-retrieval --targets)")  # fmt: skip
    ap.add_argument("--sweep-prior-weights", help="comma-separated betas: a grid, not a report")
    ap.add_argument("--sweep-prior-days", default="all", help="comma-separated, with the sweep")
    ap.add_argument("--sweep-active-days", default="all", help="comma-separated, with the sweep")
    ap.add_argument("--users", type=int, default=300, help="users sampled for the ranker runs")
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

    paths = [p for p in args.retriever.split(",") if p]
    retrievers = [load_checkpoint(p) for p in paths]
    rinfo = retrievers[0][1]
    positives = tuple(rinfo.extra.get("targets") or rinfo.extra["train"]["positive_actions"])
    if args.targets:  # e.g. a retriever trained on clicks, judged on long views
        positives = tuple(a.strip() for a in args.targets.split(",") if a.strip())
    history_len = int(rinfo.extra["history_len"])
    for p, (_, info) in zip(paths, retrievers, strict=True):
        if info.extra["split"]["train_end"] > args.train_end:
            raise SystemExit(f"{p} was trained up to {info.extra['split']['train_end']}, "
                             f"after --train-end {args.train_end}")  # fmt: skip
    log = load_kuairand(args.data)
    train = log.days(None, args.train_end)
    ev = log.days(args.eval_start, args.eval_end)
    queries = next_engagement_queries(log, ev, positives, history_len)
    n_all = len(queries)
    queries = queries.take(np.flatnonzero(queries.warm))
    start = queries.start
    print(f"{n_all:,} users engaged ({','.join(positives)}) with an unseen post on "
          f"{args.eval_start}..{args.eval_end}; {len(queries):,} of them have a history before "
          f"(evaluated), {n_all - len(queries):,} are new (cold start, left out); "
          f"{len(paths)} retriever checkpoint(s)")  # fmt: skip
    print(f"\nWhere the {sum(len(t) for t in queries.targets):,} (user, target) pairs are:")
    print(recency_of_targets(log, queries, start))
    kmax = max(CURVE_KS)
    hashes = [RowHashes(log, m.config.hash) for m, _ in retrievers]

    def tt(cfg: CorpusConfig, corpus: Corpus, k: int = kmax, qs=queries):
        return [two_tower_ranking(m, log, h, qs, corpus, k, prior_weight=cfg.prior_weight)[0]
                for (m, _), h in zip(retrievers, hashes, strict=True)]  # fmt: skip

    # 0. the grid (validation split only)
    if args.sweep_prior_weights:
        grid = list(itertools.product(
            [days_or_all(x) for x in args.sweep_active_days.split(",")],
            [days_or_all(x) for x in args.sweep_prior_days.split(",")],
            [float(x) for x in args.sweep_prior_weights.split(",")],
        ))  # fmt: skip
        lines = ["| active days | prior days | beta | corpus | " + " | ".join(METRICS)
                 + " | popularity (prior days) R@100 |", "|---|---|---:|---:|"
                 + "---:|" * (len(METRICS) + 1)]  # fmt: skip
        rows = []
        for active, pdays, beta in grid:
            cfg = CorpusConfig(active, beta, pdays)
            corpus = cfg.corpus(log, positives, start, train)
            res = mean_std([metrics_of(r, queries.targets, KS) for r in tt(cfg, corpus, 100)])
            pop = metrics_of(count_ranking(corpus.post_ids, corpus.popularity, queries.seen,
                                           100), queries.targets, KS)  # fmt: skip
            rows.append({"active_days": active, "prior_days": pdays, "prior_weight": beta,
                         "corpus": len(corpus), "two-tower": res, "popularity": pop})  # fmt: skip
            lines.append(f"| {active or 'all'} | {pdays or 'all'} | {beta:g} | {len(corpus):,} | "
                         + " | ".join(fmt(res[m], len(paths)) for m in METRICS)
                         + f" | {pop['recall@100']:.4f} |")  # fmt: skip
            print(lines[-1], flush=True)
        table = "\n".join(lines)
        print(f"\nSweep on {args.eval_start}..{args.eval_end} ({len(queries):,} users, mean ± "
              f"std over {len(paths)} checkpoint(s)):\n{table}")  # fmt: skip
        write_text_atomic(out / "sweep.md", table + "\n")
        write_json_atomic(out / "sweep.json", {"rows": rows, "users": len(queries)})
        print(f"wrote {out}/sweep.md, sweep.json")
        return

    # 1. popularity and the two-tower retriever on every evaluated user, every seed
    cfg = CorpusConfig(args.active_days, args.prior_weight, args.prior_days)
    corpus = cfg.corpus(log, positives, start, train)
    every_day = Corpus.from_log(log, train, positives, start, cfg.active_days)
    print(f"corpus {len(corpus):,} posts (shown before {args.eval_start}"
          + ("" if cfg.active_days is None else f", in the last {cfg.active_days:g} days")
          + f"); prior weight {cfg.prior_weight:g} over "
          + ("every training day" if cfg.prior_days is None else f"the last {cfg.prior_days:g}"
             " days"))  # fmt: skip
    pop_name = "popularity (every training day)"
    ranked: dict[str, list[np.ndarray]] = {
        pop_name: [count_ranking(every_day.post_ids, every_day.popularity, queries.seen, kmax)]
    }
    if cfg.prior_days is not None:
        ranked[f"popularity (last {cfg.prior_days:g} days)"] = [
            count_ranking(corpus.post_ids, corpus.popularity, queries.seen, kmax)
        ]
    # a ceiling, not a method: the one list for every user with the highest mean recall, each
    # corpus post ranked by its share of the evaluated users' targets on the evaluation days
    # (sum over users of 1 / their number of targets; reads the targets)
    every = np.concatenate(queries.targets)
    share = np.concatenate([np.full(len(t), 1.0 / len(t)) for t in queries.targets])
    posts, inv = np.unique(every, return_inverse=True)
    oracle_counts = np.zeros(len(corpus))
    pos, found = sorted_lookup(corpus.post_ids, posts)
    oracle_counts[pos[found]] = np.bincount(inv, weights=share, minlength=len(posts))[found]
    ranked[ORACLE] = [count_ranking(corpus.post_ids, oracle_counts, queries.seen, kmax)]
    no_prior = CorpusConfig(cfg.active_days, 0.0, cfg.prior_days)
    (ranked["two-tower"], tt_s) = timed(lambda: tt(no_prior, corpus))
    tt_name = "two-tower"
    if cfg.prior_weight:
        tt_name = f"two-tower + prior (beta {cfg.prior_weight:g})"
        ranked[tt_name] = tt(cfg, corpus)
    per_run = {m: [metrics_of(r, queries.targets, KS) for r in rs] for m, rs in ranked.items()}
    full = {m: mean_std(v) for m, v in per_run.items()}
    n = len(paths)
    lines = ["| method | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for m, v in full.items():
        runs = len(per_run[m])
        lines.append(f"| {m} | " + " | ".join(fmt(v[x], runs) for x in METRICS) + " |")
    full_table = "\n".join(lines)
    pops = [m for m in full if m.startswith("popularity")]
    best_pop = max(pops, key=lambda m: full[m]["recall@100"][0])
    ratios = [r["recall@100"] / per_run[best_pop][0]["recall@100"] for r in per_run[tt_name]]
    ms = 1000 * tt_s / len(queries) / n
    print(f"\nAll {len(queries):,} evaluated users, corpus {len(corpus):,} (mean ± std over "
          f"{n} retriever seed(s); two-tower {ms:.2f} ms / user):")  # fmt: skip
    print(full_table)
    print(f"\n{tt_name} Recall@100 / {best_pop} (the stronger popularity): "
          f"{np.mean(ratios):.2f}x (per seed {', '.join(f'{r:.2f}' for r in ratios)}; "
          "target >= 1.5x)")  # fmt: skip
    oracle_ratio = per_run[ORACLE][0]["recall@100"] / per_run[best_pop][0]["recall@100"]
    print(f"{ORACLE} Recall@100 / {best_pop}: {oracle_ratio:.2f}x")
    curves_all = {m: [curve(r, queries.targets) for r in rs] for m, rs in ranked.items()}
    panels = [(f"all {len(queries):,} users, {n} seed(s), corpus {len(corpus):,}", curves_all)]
    result = {"all_users": {m: {x: list(v) for x, v in d.items()} for m, d in full.items()},
              "per_seed": per_run, "ratio_recall@100": ratios, "baseline": best_pop,
              "oracle_ratio_recall@100": oracle_ratio,
              "users": len(queries), "corpus": len(corpus), "config": cfg.to_dict(),
              "retrievers": paths}  # fmt: skip
    report = full_table + "\n"

    # 2. a sample of them through the ranker: over the whole corpus, and retrieve-then-rank
    if args.ranker:
        retriever = retrievers[0][0]
        ranker, _ = load_checkpoint(args.ranker)
        rng = np.random.default_rng(args.seed)
        pick = np.sort(rng.choice(len(queries), size=min(args.users, len(queries)),
                                  replace=False))  # fmt: skip
        sample = queries.take(pick)
        requests = [UserRequest.from_log(log, int(u), history_len, before_time=start)
                    for u in sample.users]  # fmt: skip
        for r, s in zip(requests, sample.seen, strict=True):
            assert np.array_equal(r.seen_post_ids, s)
        U = len(requests)
        rows, curves = {}, {}
        unseen = np.mean([len(corpus) - len(corpus.positions(s)) for s in sample.seen])

        def add(name, ranked_ids, seconds, ranker_cands):
            ks = [k for k in KS if k <= ranked_ids.shape[1]]
            rows[name] = {**metrics_of(ranked_ids, sample.targets, ks),
                          "ranker candidates / user": ranker_cands,
                          "ms / user": 1000 * seconds / U}  # fmt: skip
            curves[name] = [curve(ranked_ids, sample.targets)]
            print(f"  {name}: {json.dumps({k: round(v, 4) for k, v in rows[name].items()})}",
                  flush=True)  # fmt: skip

        scorer = None
        if args.weights:
            acts, cont = ranker.config.actions, ranker.config.continuous_actions
            scorer = WeightedScorer(ScoringConfig(weights=json.loads(args.weights)), acts, cont)
            print(f"scorer weights {args.weights}")
        add(best_pop, ranked[best_pop][0][pick], 0.0, 0)
        h0 = hashes[0]
        got, s = timed(lambda: two_tower_ranking(retriever, log, h0, sample, corpus, kmax,
                                                 prior_weight=cfg.prior_weight)[0])  # fmt: skip
        add(tt_name, got, s, 0)
        pipe = RecommendPipeline(retriever, ranker, corpus, scorer, retrieve_k=100,
                                 prior_weight=cfg.prior_weight)  # fmt: skip
        print(f"ranker over the whole corpus for {U} users ...", flush=True)
        rc, s = timed(lambda: ranker_over_corpus(pipe, requests, kmax, args.batch))
        add("ranker over corpus", rc, s, float(unseen))
        for rk in (int(x) for x in args.retrieve_k.split(",")):
            pipe = RecommendPipeline(retriever, ranker, corpus, scorer, retrieve_k=rk,
                                     prior_weight=cfg.prior_weight)  # fmt: skip
            rr, s = timed(lambda p=pipe, k=rk: retrieve_then_rank(p, requests, k, 64))
            add(f"retrieve {rk} then rank", rr, s, rk)
        names = [*METRICS, "ranker candidates / user", "ms / user"]
        lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for m, v in rows.items():
            cells = [f"{v[x]:.4f}" if x in v and x.startswith(("recall", "ndcg")) else
                     (f"{v[x]:,.0f}" if x.startswith("ranker") else
                      (f"{v[x]:.2f}" if x in v else "-")) for x in names]  # fmt: skip
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        table = "\n".join(lines)
        print(f"\nSample of {U} users (seed {args.seed}), first retriever, ranker runs:")
        print(table)
        rc_ndcg = rows["ranker over corpus"]["ndcg@10"]
        for m in rows:
            if m.startswith("retrieve"):
                rel = rows[m]["ndcg@10"] / rc_ndcg - 1 if rc_ndcg else float("inf")
                cost = rows[m]["ms / user"] / rows["ranker over corpus"]["ms / user"]
                print(f"{m}: NDCG@10 {rel:+.1%} vs ranker over corpus (target within 2%), "
                      f"{cost:.3f}x its wall time, "
                      f"{rows[m]['ranker candidates / user'] / unseen:.3f}x its ranker "
                      "candidates")  # fmt: skip
        panels.append((f"{U} sampled users, first seed: the ranker", curves))
        result |= {"sample": rows, "sample_users": U}
        report += "\n" + table + "\n"
    plot(panels, out / "recall_at_k.png")
    write_json_atomic(out / "metrics.json", result)
    write_text_atomic(out / "results.md", report)
    print(f"wrote {out}/metrics.json, results.md, recall_at_k.png")


if __name__ == "__main__":
    main()
