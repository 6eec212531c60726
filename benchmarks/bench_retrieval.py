"""Top-100 retrieval throughput over a large synthetic corpus, and end-to-end latency.

Part 1 (always): N synthetic posts (default 1 M, D = 64; unit vectors drawn around 2,000
cluster centres, as trained embeddings cluster; users drawn the same way). Users/s for top-100
of: ``ExactIndex`` (chunked matrix products, several chunk sizes), faiss flat inner product
(exact), faiss IVF-flat at several ``nprobe`` and, with ``--hnsw``, faiss HNSW; each ANN with its
recall@100 against the exact result. All on the same threads, min of ``--repeats`` interleaved
runs, ratios against faiss flat and against exact measured in this run.

Part 2 (with ``--ranker``/``--retriever``/``--data``): ``RecommendPipeline.recommend`` latency
per user (one user per call: retrieve top-100 from the data's corpus, rank, score), p50/p99.

    flock /tmp/hashrec-heavy.lock python benchmarks/bench_retrieval.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hashrec.models.two_tower import l2_normalise
from hashrec.retrieval import ExactIndex, FaissIndex


def synthetic(n: int, d: int, centres: int, spread: float, seed: int) -> torch.Tensor:
    """n unit vectors around the same ``centres`` random centres (seed 0), noise from ``seed``."""
    c = l2_normalise(torch.randn(centres, d, generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(seed + 1)
    which = torch.randint(0, centres, (n,), generator=g)
    return l2_normalise(c[which] + spread * torch.randn(n, d, generator=g) / d**0.5)


def recall(ann: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(e)) for a, e in zip(ann.tolist(), exact.tolist(), strict=True))
    return hits / exact.numel()


def run_search(index, queries: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    out = []
    for lo in range(0, len(queries), batch):
        out.append(index.search(queries[lo : lo + batch], k).indices)
    return torch.cat(out)


def part1(args) -> None:
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(f"corpus {args.posts:,} x {args.dim}, {args.users:,} users, top-{args.k}, "
          f"{args.threads} threads, query batch {args.batch}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    corpus = synthetic(args.posts, args.dim, args.centres, args.spread, seed=0)
    queries = synthetic(args.users, args.dim, args.centres, args.spread, seed=1)
    print(f"data {time.perf_counter() - t0:.1f} s", flush=True)
    methods: dict[str, object] = {}
    for chunk in args.chunks:
        methods[f"exact chunked ({chunk:,})"] = ExactIndex(corpus, chunk_size=chunk)
    t0 = time.perf_counter()
    methods["faiss flat IP"] = FaissIndex(corpus, kind="flat")
    ivf_base = FaissIndex(corpus, kind="ivf", nlist=args.nlist, nprobe=1)
    print(f"faiss IVF{args.nlist} built in {time.perf_counter() - t0:.1f} s", flush=True)
    ann: dict[str, tuple[object, int]] = {f"faiss IVF{args.nlist} nprobe={p}": (ivf_base, p)
                                          for p in args.nprobe}  # fmt: skip
    if args.hnsw:
        t0 = time.perf_counter()
        hnsw = FaissIndex(corpus, kind="hnsw", m=32, ef_construction=64)
        print(f"faiss HNSW32 built in {time.perf_counter() - t0:.1f} s", flush=True)
        for ef in args.ef:
            ann[f"faiss HNSW32 ef={ef}"] = (hnsw, ef)

    def search(name):
        if name in methods:
            return run_search(methods[name], queries, args.k, args.batch)
        index, param = ann[name]
        if "IVF" in name:
            index.index.nprobe = param
        else:
            index.index.hnsw.efSearch = param
        return run_search(index, queries, args.k, args.batch)

    names = [*methods, *ann]
    best = dict.fromkeys(names, float("inf"))
    results = {}
    for _ in range(args.repeats):  # interleaved: load changes hit every method alike
        for name in names:
            t0 = time.perf_counter()
            results[name] = search(name)
            best[name] = min(best[name], time.perf_counter() - t0)
    exact = results[next(iter(methods))]
    ref = reference_check(corpus, queries[:64], args.k, exact[:64])
    flat_ups = args.users / best["faiss flat IP"]
    exact_ups = max(args.users / best[n] for n in methods if n.startswith("exact"))
    print()
    print("| method | users/s | x faiss flat | x best exact | recall@100 vs exact |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        ups = args.users / best[name]
        r = recall(results[name], exact)
        print(f"| {name} | {ups:,.0f} | {ups / flat_ups:.2f} | {ups / exact_ups:.2f} | {r:.4f} |")
    print(f"\nexact chunked results equal the full-sort reference on 64 users: {ref}")


def reference_check(corpus, queries, k, got) -> bool:
    from hashrec.retrieval import reference_top_k

    return bool(torch.equal(reference_top_k(corpus, queries, k).indices, got))


def part2(args) -> None:
    from hashrec.data import load_kuairand
    from hashrec.serving.pipeline import Corpus, RecommendPipeline, UserRequest
    from hashrec.training.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    retriever, info = load_checkpoint(args.retriever)
    ranker, _ = load_checkpoint(args.ranker)
    log = load_kuairand(args.data)
    corpus = Corpus.from_log(log)
    pipe = RecommendPipeline(retriever, ranker, corpus, retrieve_k=100)
    rng = np.random.default_rng(0)
    users = rng.choice(np.unique(log.user), size=args.latency_users, replace=False)
    hl = int(info.extra.get("history_len", 32))
    reqs = [UserRequest.from_log(log, int(u), hl) for u in users]
    for r in reqs[:5]:
        pipe.recommend(r, 20)  # warm-up
    lat = []
    for r in reqs:
        t0 = time.perf_counter()
        pipe.recommend(r, 20)
        lat.append(time.perf_counter() - t0)
    ms = 1000 * np.array(lat)
    print(f"\nrecommend (retrieve 100 of {len(corpus):,}, rank, score, top 20), one user per "
          f"call, {len(ms)} users: p50 {np.percentile(ms, 50):.1f} ms, "
          f"p99 {np.percentile(ms, 99):.1f} ms, mean {ms.mean():.1f} ms")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--posts", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--users", type=int, default=2048)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256, help="users per search call")
    ap.add_argument("--centres", type=int, default=2000)
    ap.add_argument("--spread", type=float, default=0.5, help="noise norm around a centre")
    ap.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",")],
                    default=[16_384, 65_536, 262_144])  # fmt: skip
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=lambda s: [int(x) for x in s.split(",")],
                    default=[8, 16, 32])  # fmt: skip
    ap.add_argument("--hnsw", action="store_true", help="also build HNSW (slow to build)")
    ap.add_argument("--ef", type=lambda s: [int(x) for x in s.split(",")], default=[128, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ranker")
    ap.add_argument("--retriever")
    ap.add_argument("--data")
    ap.add_argument("--latency-users", type=int, default=300)
    ap.add_argument("--skip-index", action="store_true")
    args = ap.parse_args()
    if not args.skip_index:
        part1(args)
    if args.ranker and args.retriever and args.data:
        part2(args)


if __name__ == "__main__":
    main()
