"""Benchmark: training throughput on 1 and 2 processes, table memory per rank, sharded or not.

    flock /tmp/hashrec-heavy.lock python benchmarks/bench_distributed.py          # full
    python benchmarks/bench_distributed.py --quick                                  # smoke run
    python benchmarks/bench_distributed.py --phoenix      # paper-scale extrapolation, no training

Trains the ranker on the shipped KuaiRand sample with a large hash table (``--rows`` rows of
width ``--dim``), with the trainer's own step (``Trainer.train_step``). Rows:

- 1 process with 1 thread and with ``--threads`` threads (the same cores as 2 processes);
- 2 processes (gloo, 1 thread each): the table replicated (its sparse gradients gathered), then
  sharded through TorchRec column-wise and table-wise (when TorchRec is installed).

examples/s counts training candidates of the global batch per second over the timed steps
(after warm-up), the median of the ranks' rates; memory is what each rank holds for the table
(weights + row-wise Adagrad state) and its peak resident memory. Ratios compare rows of this run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): train ``--steps`` timed steps, write its figures."""
    import torch

    from hashrec.data import ExampleConfig, RowHashes, build_requests, load_kuairand
    from hashrec.datasets import kuairand_sample_dir
    from hashrec.evaluation.experiment import ModelSpec, ranker_config
    from hashrec.hashing.config import HashConfig
    from hashrec.models.ranker import PhoenixRanker
    from hashrec.nn.transformer import TransformerConfig
    from hashrec.training.trainer import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    log = load_kuairand(kuairand_sample_dir())
    per = args.rows // 3
    spec = ModelSpec("bench", HashConfig.sized({"user": per, "post": per, "author": per}, 2),
                     TransformerConfig(dim=args.dim, num_layers=2, num_q_heads=2,
                                       num_kv_heads=1, widening_factor=2.0))  # fmt: skip
    torch.manual_seed(0)
    model = PhoenixRanker(ranker_config(log, spec))
    train = log.days(None, 20220502)
    req = build_requests(log, train, ExampleConfig(32, 16, negatives_per_request=0))
    hashes = RowHashes(log, spec.hash_config)
    cfg = TrainConfig(batch_size=args.batch, table_sharding=args.sharding)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, cfg, tmp, progress=False)
        order = np.random.default_rng(0).permutation(len(req))
        n = args.batch

        def step(i: int) -> int:
            lo = (i * n) % (len(order) - n)
            return trainer.train_step(log, hashes, req, order[lo : lo + n]).examples

        for i in range(args.warmup):
            step(i)
        t0, seen = time.perf_counter(), 0
        for i in range(args.warmup, args.warmup + args.steps):
            seen += step(i)
        seconds = time.perf_counter() - t0
        table_b, optim_b = trainer.parallel.table_bytes(trainer.table)
        trainer.parallel.end(trainer.table)
    out = {
        "rank": trainer.ctx.rank,
        "examples_per_s": seen / seconds,
        "table_bytes": table_b,
        "optimizer_bytes": optim_b,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    Path(args.out).with_suffix(f".rank{trainer.ctx.rank}.json").write_text(json.dumps(out))
    from hashrec.training.distributed import teardown

    teardown()


def launch(args: argparse.Namespace, nproc: int, threads: int, sharding: str, out: Path) -> list:
    cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--threads", str(threads),
           "--sharding", sharding, "--rows", str(args.rows), "--dim", str(args.dim),
           "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *cmd[1:]]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(nproc)]


PHOENIX_ROWS = {"user": 100_000_000, "post": 100_000_000, "author": 30_000_000}


def phoenix_table(width: int = 1024, per_device_batch: int = 512, history: int = 128,
                  candidates: int = 32, hashes: int = 2) -> None:  # fmt: skip
    """Per-device table memory and per-step all-to-all bytes at Phoenix's sizes (formulas).

    Rows looked up per request: user k + history S x (post k + author k) + candidates C x
    (post k + author k). Values bf16 (2 bytes), ids int64, row-wise Adagrad state fp32 per row
    (per row *and column shard* for column-wise: FBGEMM keeps one per shard). All-to-all bytes
    are what one device sends per step (forward embeddings + backward gradients, bf16, + ids),
    without de-duplication; the replicated table instead all-gathers its touched rows' gradients.
    """
    rows = sum(PHOENIX_ROWS.values())
    table = rows * width * 2
    acc = rows * 4
    lookups = per_device_batch * (hashes + (history + candidates) * 2 * hashes)
    gb = 1e9
    print(f"Phoenix-scale table: {rows / 1e6:,.0f} M rows x {width} bf16 = {table / gb:,.0f} GB; "
          f"{per_device_batch} requests/device/step, S={history}, C={candidates}, k={hashes}: "
          f"{lookups:,} looked-up rows/device/step")  # fmt: skip
    print()
    print("| devices N | layout | table + Adagrad state per device (GB) "
          "| sent per device per step (MB; all-gather for replicated) |")  # fmt: skip
    print("|---|---|---|---|")
    for n in (8, 16, 64):
        remote = (n - 1) / n
        vec = lookups * width * 2 * remote * 2  # forward out + backward in, bf16
        layouts = {
            "replicated (DDP, sparse grads all-gathered)": (
                table + acc, lookups * (width * 2 + 8) * (n - 1)),
            "column-wise (Phoenix, TorchRec default here)": (
                table / n + acc, vec + lookups * 8 * (n - 1)),  # every id goes to every shard
            "row-wise": (table / n + acc / n, vec + lookups * 8 * remote),
        }  # fmt: skip
        for name, (mem, sent) in layouts.items():
            print(f"| {n} | {name} | {mem / gb:,.1f} | {sent / 1e6:,.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small table, few steps")
    p.add_argument("--rows", type=int, default=3_000_000, help="table rows (3 entity blocks)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=128, help="global batch (requests)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="threads of the 1-process row")
    p.add_argument("--sharding", default="replicated")
    p.add_argument("--phoenix", action="store_true", help="print the paper-scale table only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.phoenix:
        return phoenix_table()
    if args.quick:
        args.rows, args.steps, args.warmup = 30_000, 5, 2
    from hashrec.training.sharded import torchrec_available

    runs = [("1 process, 1 thread", 1, 1, "replicated"),
            (f"1 process, {args.threads} threads", 1, args.threads, "replicated"),
            ("2 processes, table replicated", 2, 1, "replicated")]  # fmt: skip
    if torchrec_available():
        runs += [("2 processes, column-wise (TorchRec)", 2, 1, "column_wise"),
                 ("2 processes, table-wise (TorchRec)", 2, 1, "table_wise")]  # fmt: skip
    mib = 2**20
    print(f"table {args.rows:,} rows x {args.dim} fp32 ({args.rows * args.dim * 4 / mib:,.0f} "
          f"MiB), global batch {args.batch} requests, {args.steps} timed steps; "
          f"{os.cpu_count()} CPU cores")  # fmt: skip
    print()
    print("| run | examples/s | vs 1 process, 1 thread | table + optimizer per rank (MiB) "
          "| peak RSS per rank (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, nproc, threads, sharding) in enumerate(runs):
            ranks = launch(args, nproc, threads, sharding, Path(tmp) / f"run{i}")
            rate = float(np.median([r["examples_per_s"] for r in ranks]))
            base = base or rate
            mem = " / ".join(f"{(r['table_bytes'] + r['optimizer_bytes']) / mib:,.1f}"
                             for r in ranks)  # fmt: skip
            rss = " / ".join(f"{r['peak_rss_bytes'] / mib:,.0f}" for r in ranks)
            print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {mem} | {rss} |", flush=True)


if __name__ == "__main__":
    main()
