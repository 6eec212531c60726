"""Benchmark: hashing throughput, fused lookup, and the table's training step.

    python benchmarks/bench_table.py            # full size: D=64, two 1M-row hash tables
    python benchmarks/bench_table.py --quick    # smaller, for a smoke run
    python benchmarks/bench_table.py --device cuda   # hashing, lookup and step on a GPU

Every ratio compares rows measured in this same run (the machine is shared and noisy).
Optional rows: numba (pip install numba), FBGEMM's table-batched embedding with row-wise Adagrad
(pip install fbgemm-gpu-cpu==1.8.0 && pip install torchrec==1.8.0 --no-deps).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import replace

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch: see README "Performance"

import numpy as np
import torch
import torch.nn.functional as F
from options import add_device_option, synchronize
from torch import nn

from hashrec.data.tables import frequency_map
from hashrec.hashing.config import PHOENIX_ENTITIES, EntityHash, HashConfig
from hashrec.hashing.functions import (
    default_hash,
    default_hash_torch,
    phoenix_hash,
    phoenix_hash_reference,
    phoenix_hash_torch,
)
from hashrec.nn.layouts import weighted_combine, weighted_lookup
from hashrec.nn.optim import RowWiseAdagrad
from hashrec.nn.table import FusedEmbeddingTable, MultiHashEmbedding

CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU time, less hit by other load)
DEVICE = torch.device("cpu")  # --device


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls (on a GPU: from an idle device to the work done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(DEVICE)
        t0 = CLOCK()
        fn()
        synchronize(DEVICE)
        times.append(CLOCK() - t0)
    return float(np.median(times))


def make_ids(
    n: int, vocab: int, skew: bool, pad_frac: float, rng: np.random.Generator
) -> np.ndarray:
    """Raw IDs: Zipf-like (a ~ 1.1, the head of a feed) or uniform, with a padding fraction."""
    if skew:
        ranks = rng.zipf(1.1, n) % vocab
        ids = rng.permutation(vocab)[ranks].astype(np.int64) * 7919 + 1  # spread ids over int64
    else:
        ids = rng.integers(1, 2**62, n, dtype=np.int64)
    ids[rng.random(n) < pad_frac] = 0
    return ids


def table_rows(table: list[tuple[str, float, str]], title: str) -> None:
    print(f"\n## {title}\n")
    w = max(len(r[0]) for r in table)
    for name, val, extra in table:
        print(f"| {name:<{w}} | {val:>10.3f} | {extra}")


def bench_hashing(n: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**63 - 1, n, dtype=np.int64)
    ph = PHOENIX_ENTITIES["post"]
    args = (ph.scales, ph.biases, ph.modulus, 1_000_000)
    tids = torch.from_numpy(ids)
    rows: list[tuple[str, float]] = [
        ("phoenix numpy (hashrec)", best_time(lambda: phoenix_hash(ids, *args), repeats)),
        (
            "phoenix numpy plain formula",
            best_time(lambda: phoenix_hash_reference(ids, *args), repeats),
        ),
        ("phoenix torch", best_time(lambda: phoenix_hash_torch(tids, *args), repeats)),
        ("default numpy", best_time(lambda: default_hash(ids, 2, 1_000_000), repeats)),
        ("default torch", best_time(lambda: default_hash_torch(tids, 2, 1_000_000), repeats)),
    ]
    if DEVICE.type != "cpu":
        dids = tids.to(DEVICE)
        for name, fn, ref in (
            ("phoenix torch", lambda: phoenix_hash_torch(dids, *args), phoenix_hash(ids, *args)),
            ("default torch", lambda: default_hash_torch(dids, 2, 1_000_000),
             default_hash(ids, 2, 1_000_000)),
        ):  # fmt: skip
            assert np.array_equal(fn().cpu().numpy(), ref), f"{name} on {DEVICE} disagrees"
            rows.append((f"{name} on {DEVICE.type}", best_time(fn, repeats)))
    try:
        import numba

        @numba.njit(cache=False)
        def _hash_ids_batch(arr, scales, biases, modulus, num_buckets):  # X's loop, verbatim
            ids_ = arr.ravel()
            out = np.empty((len(ids_), len(scales)), dtype=np.int64)
            for i in range(len(ids_)):
                for j in range(len(scales)):
                    raw = (ids_[i] * scales[j] + biases[j]) % modulus
                    out[i, j] = 0 if ids_[i] == 0 else ((raw % (num_buckets - 1)) + 1)
            return out

        s, b = np.array(ph.scales, np.int64), np.array(ph.biases, np.int64)
        ref = _hash_ids_batch(ids, s, b, ph.modulus, 1_000_000)
        assert np.array_equal(ref, phoenix_hash(ids, *args)), "numba loop disagrees"
        rows.append(
            (
                "phoenix numba loop (X's)",
                best_time(lambda: _hash_ids_batch(ids, s, b, ph.modulus, 1_000_000), repeats),
            )
        )
    except ImportError:
        print("(numba not installed: no numba row)")
    base = rows[0][1]
    out = [
        (name, 2 * n / t / 1e6, f"M hash values/s   {base / t:5.2f}x of hashrec")
        for name, t in rows
    ]
    table_rows(out, f"Hashing throughput, k = 2, {n:,} int64 IDs (M values/s)")


class NotebookEmbedding(nn.Module):
    """The lecture notebook's design: one nn.Embedding per hash, looked up in a Python loop."""

    def __init__(self, vocab: int, dim: int, num_hashes: int, sparse: bool) -> None:
        super().__init__()
        self.tables = nn.ModuleList(
            nn.Embedding(vocab, dim, padding_idx=0, sparse=sparse) for _ in range(num_hashes)
        )

    def forward(self, hashes: torch.Tensor) -> torch.Tensor:
        return torch.stack([t(hashes[..., j]) for j, t in enumerate(self.tables)], dim=-2)


def fbgemm_table(vocab: int, dim: int, num_hashes: int, lr: float):
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            EmbeddingLocation,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except ImportError:
        return None
    where = (
        (EmbeddingLocation.DEVICE, ComputeDevice.CUDA)
        if DEVICE.type == "cuda"
        else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    )
    try:
        return SplitTableBatchedEmbeddingBagsCodegen(
            [(vocab, dim, *where)] * num_hashes,
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=lr,
            eps=1e-8,
            pooling_mode=PoolingMode.SUM,
        )
    except (RuntimeError, AssertionError, NotImplementedError):
        if DEVICE.type == "cuda":
            return None  # the CPU build of fbgemm-gpu has no CUDA kernels
        raise


def fbgemm_inputs(hashes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of length 1, or 0 for padding (FBGEMM's fastest CPU mode), table-major."""
    cols = hashes.T.contiguous()  # [K, n]
    lengths = (cols != 0).to(torch.int64).reshape(-1)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=hashes.device)
    offsets[1:] = torch.cumsum(lengths, 0)
    return cols.reshape(-1)[lengths.bool()], offsets


def bench_table(n_ids: int, vocab: int, dim: int, repeats: int, skew: bool) -> None:
    K = 2
    rng = np.random.default_rng(1)
    ids = make_ids(n_ids, 50 * n_ids, skew, 0.03, rng)
    hashes = torch.from_numpy(default_hash(ids, K, vocab)).to(DEVICE)  # [n, K] local, 0 = pad
    n_rows = hashes.numel()
    kind = "Zipf-like ids, 3% padding" if skew else "uniform ids, 3% padding"
    torch.manual_seed(0)

    fused = MultiHashEmbedding(vocab, dim, K, sparse=True, init_std=0.05).to(DEVICE)
    table = FusedEmbeddingTable(K * vocab, dim).to(DEVICE)  # global rows, as Phoenix's loader
    notebook = NotebookEmbedding(vocab, dim, K, sparse=True).to(DEVICE)
    with torch.no_grad():  # same weights everywhere
        for j, t in enumerate(notebook.tables):
            t.weight.copy_(fused.weight[j * vocab : (j + 1) * vocab])
            t.weight[0].zero_()
        table.weight.copy_(fused.weight)
    fused_rows = torch.where(hashes == 0, hashes, hashes + fused.hash_offsets).reshape(-1)
    bag = nn.EmbeddingBag.from_pretrained(fused.weight.detach().clone(), mode="sum")
    bag_offsets = torch.arange(n_rows, dtype=torch.int64, device=DEVICE)
    buf = torch.empty(n_rows, dim, device=DEVICE)
    w = fused.weight.detach()

    with torch.inference_mode():
        assert torch.equal(fused(hashes), notebook(hashes))
        assert torch.equal(table(fused_rows), fused(hashes).reshape(n_rows, dim))
        fwd = [
            (
                "index_select into preallocated buffer",
                best_time(lambda: torch.index_select(w, 0, fused_rows, out=buf), repeats),
            ),
            (
                "F.embedding (nn.Embedding's gather)",
                best_time(lambda: F.embedding(fused_rows, w), repeats),
            ),
            ("hashrec FusedEmbeddingTable (rows)", best_time(lambda: table(fused_rows), repeats)),
            (
                "hashrec MultiHashEmbedding (local hashes)",
                best_time(lambda: fused(hashes), repeats),
            ),
            ("notebook per-hash loop", best_time(lambda: notebook(hashes), repeats)),
            (
                "nn.EmbeddingBag (bags of 1)",
                best_time(lambda: bag(fused_rows, bag_offsets), repeats),
            ),
        ]
    # the ceiling: the faster plain gather (index_select on a CPU; F.embedding's on a GPU)
    ceiling = min(fwd[0][1], fwd[1][1])
    nb = fwd[4][1]
    out = []
    for name, t in fwd:
        gbs = n_rows * dim * 4 / t / 1e9
        out.append(
            (
                name,
                n_rows / t / 1e6,
                f"M rows/s  {gbs:6.2f} GB/s  {ceiling / t:5.1%} of ceiling  "
                f"{nb / t:5.2f}x notebook",
            )
        )
    best = fwd[0][0] if fwd[0][1] <= fwd[1][1] else fwd[1][0]
    table_rows(out, f"Lookup, D={dim}, {K} x {vocab:,}-row tables, {n_rows:,} rows/call, {kind}; "
               f"ceiling: the faster plain gather ({best})")  # fmt: skip

    # Training step: forward + backward + row-wise Adagrad on the table.
    lr = 0.01
    grad_seed = torch.randn(n_ids, K, dim, device=DEVICE)
    opt = RowWiseAdagrad(table.parameters(), lr=lr)
    seed_rows = grad_seed.reshape(n_rows, dim)

    def step_fused() -> None:
        loss = (table(fused_rows) * seed_rows).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    nb_opt = torch.optim.Adagrad(notebook.parameters(), lr=lr)

    def step_notebook() -> None:
        loss = (notebook(hashes) * grad_seed).sum()
        loss.backward()
        nb_opt.step()
        nb_opt.zero_grad(set_to_none=True)

    steps = [
        ("hashrec FusedEmbeddingTable + RowWiseAdagrad", best_time(step_fused, repeats)),
        ("notebook loop + torch Adagrad (sparse)", best_time(step_notebook, repeats)),
    ]
    tbe = fbgemm_table(vocab, dim, K, lr)
    if tbe is not None:
        indices, offsets = fbgemm_inputs(hashes)
        seed_flat = grad_seed.permute(0, 1, 2).reshape(n_ids, K * dim)

        def step_fbgemm() -> None:
            out = tbe(indices, offsets)  # [n, K*D]; backward applies the optimizer
            (out * seed_flat).sum().backward()

        steps.insert(
            0, ("FBGEMM TBE, EXACT_ROWWISE_ADAGRAD (anchor)", best_time(step_fbgemm, repeats))
        )
    else:
        build = "fbgemm-gpu (CUDA build)" if DEVICE.type == "cuda" else "fbgemm-gpu-cpu"
        print(f"({build} not installed: no FBGEMM anchor row)")
    anchor = steps[0][1]
    out = [
        (name, n_rows / t / 1e6, f"M rows/s  {t * 1e3:8.1f} ms/step  {anchor / t:5.2f}x of anchor")
        for name, t in steps
    ]
    table_rows(out, f"Training step (fwd + bwd + optimizer), {kind}")


def layout_entities(ids: np.ndarray, budget: int) -> dict[str, EntityHash]:
    """Each table scheme at ``budget`` rows (the shares of ``hashrec.data.tables``)."""
    head = frequency_map(ids, budget // 2)
    return {
        "multihash k=2 (Phoenix, baseline)": EntityHash("post", 2, budget, seed=2),
        "multihash k=1": EntityHash("post", 1, budget, seed=2),
        "hybrid k=2": EntityHash("post", 2, budget - len(head) - len(head) * 8 // 260 - 1,
                                 seed=2, layout="hybrid", head_ids=tuple(head.tolist())),
        "weighted k=2": EntityHash("post", 2, budget - budget // 4, seed=2, layout="weighted",
                                   extra_rows=budget // 4),
        "qr": EntityHash("post", 2, budget // 2, seed=2, layout="qr", extra_rows=budget // 2),
    }  # fmt: skip


def bench_layouts(
    n_ids: int, budget: int, dim: int, repeats: int, combine_row: bool = False
) -> None:
    """Every table scheme at the same bytes: index computation (raw IDs -> rows, numpy, in the
    data loader), lookup (rows -> K vectors, with the importance weights where there are) and
    the training step (lookup + backward + row-wise Adagrad). ``combine_row`` adds the weighted
    layout's D-wide path (gather, then ``weighted_combine``: a sharded table's path); its large
    temporaries slow the rows timed after it, so it is off by default."""
    rng = np.random.default_rng(2)
    ids = make_ids(n_ids, 20 * budget, True, 0.03, rng)
    small = (EntityHash("user", 1, 2, seed=1), EntityHash("author", 1, 2, seed=3))
    fns: dict[str, list] = {}
    # weighted read from the table (weighted_lookup, what the ranker does) and, with
    # combine_row, gathered D wide then combined (weighted_combine)
    schemes = {}
    for name, ent in layout_entities(ids, budget).items():
        schemes[name] = ent
        if combine_row and ent.layout == "weighted":
            schemes[f"{name}, gather + combine"] = ent
    for name, ent in schemes.items():
        cfg = HashConfig(entities=(small[0], ent, small[1]), reserved_rows=0)
        rows = torch.from_numpy(cfg.rows("post", ids))  # [n, slots]
        torch.manual_seed(0)
        table = FusedEmbeddingTable(cfg.num_rows, dim)
        opt = RowWiseAdagrad(table.parameters(), lr=0.01)
        weighted = ent.layout == "weighted"
        combine = name.endswith("gather + combine")

        def lookup(rows=rows, table=table, weighted=weighted, combine=combine) -> torch.Tensor:
            if not weighted:
                return table(rows)
            return weighted_combine(rows, table(rows)) if combine else weighted_lookup(table, rows)

        seed = torch.randn(n_ids, ent.num_hashes, dim)

        def step(lookup=lookup, seed=seed, opt=opt) -> None:
            (lookup() * seed).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def lookup_nograd(lookup=lookup) -> None:
            with torch.inference_mode():
                lookup()

        fns[name] = [lambda cfg=cfg: cfg.rows("post", ids), lookup_nograd, step]
    # interleaved: round r times every scheme once, so load changes hit all schemes alike
    times = {name: [[], [], []] for name in fns}
    for r in range(repeats + 1):
        for name, fs in fns.items():
            for j, f in enumerate(fs):
                t0 = CLOCK()
                f()
                if r:  # round 0 warms up
                    times[name][j].append(CLOCK() - t0)
    idx_t, look_t, step_t = (
        [(name, float(np.median(times[name][j]))) for name in fns] for j in range(3)
    )
    for title, ts in (("Index computation (raw IDs -> rows, numpy)", idx_t),
                      ("Lookup (rows -> K vectors)", look_t),
                      ("Training step (lookup + backward + RowWiseAdagrad)", step_t)):  # fmt: skip
        base = ts[0][1]
        out = [(n, n_ids / t / 1e6, f"M IDs/s  {t * 1e3:8.1f} ms  {t / base:5.2f}x the time "
                "of multihash k=2") for n, t in ts]  # fmt: skip
        table_rows(out, f"{title}: each scheme at {budget:,} rows x D={dim}, {n_ids:,} "
                   "Zipf-like IDs per call")  # fmt: skip


def bench_layout_ranker(budget: int, repeats: int, batch_size: int = 128) -> None:
    """The ranker's whole training step (the demo's model, D=32) under each table scheme, on
    random Zipf-like requests: what a training run pays for the layout."""
    from hashrec.models.ranker import PhoenixRanker, RankerConfig
    from hashrec.nn.batch import RecsysBatch
    from hashrec.nn.transformer import TransformerConfig

    rng = np.random.default_rng(3)
    B, S, C, A = batch_size, 32, 16, 8
    raw = {e: make_ids(B * (S + C) + B, 20 * budget, True, 0.0, rng) for e in ("u", "p", "a")}
    ents = {n: layout_entities(raw["p"], budget)[n] for n in layout_entities(raw["p"], budget)}
    fns = {}
    for name, post in ents.items():
        user = replace(post, name="user", seed=1, head_ids=tuple(
            frequency_map(raw["u"], len(post.head_ids)).tolist()))  # fmt: skip
        author = replace(post, name="author", seed=3, head_ids=tuple(
            frequency_map(raw["a"], len(post.head_ids)).tolist()))  # fmt: skip
        cfg = HashConfig(entities=(user, post, author))
        tf = TransformerConfig(dim=32, num_layers=2, num_q_heads=2, num_kv_heads=1,
                               widening_factor=2.0)  # fmt: skip
        torch.manual_seed(0)
        model = PhoenixRanker(RankerConfig(hash=cfg, transformer=tf, actions=tuple("abcdefgh"),
                                           continuous_actions=()))  # fmt: skip
        p_rows = cfg.rows("post", raw["p"][: B * (S + C)]).reshape(B, S + C, -1)
        a_rows = cfg.rows("author", raw["a"][: B * (S + C)]).reshape(B, S + C, -1)
        batch = RecsysBatch(
            torch.from_numpy(cfg.rows("user", raw["u"][:B])),
            torch.from_numpy(p_rows[:, :S]), torch.from_numpy(a_rows[:, :S]),
            torch.from_numpy(rng.random((B, S, A)) < 0.2),
            torch.from_numpy(rng.integers(0, 16, (B, S))),
            torch.from_numpy(p_rows[:, S:]), torch.from_numpy(a_rows[:, S:]),
            torch.from_numpy(rng.integers(0, 16, (B, C))),
        )  # fmt: skip
        dense = torch.optim.AdamW(model.dense_parameters(), lr=1e-3)
        table = RowWiseAdagrad(model.table.parameters(), lr=0.05)
        target = torch.from_numpy(rng.random((B, C, A)) < 0.3).float()

        def step(model=model, batch=batch, dense=dense, table=table, target=target) -> None:
            logits = model(batch).logits
            torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
            dense.step()
            table.step()
            dense.zero_grad(set_to_none=True)
            table.zero_grad(set_to_none=True)

        fns[name] = step
    times: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(repeats + 1):
        for name, f in fns.items():
            t0 = CLOCK()
            f()
            if r:
                times[name].append(CLOCK() - t0)
    ts = [(n, float(np.median(v))) for n, v in times.items()]
    base = ts[0][1]
    out = [(n, B / t, f"requests/s  {t * 1e3:8.1f} ms  {t / base:5.2f}x the time of multihash "
            "k=2") for n, t in ts]  # fmt: skip
    table_rows(out, f"Ranker training step (D=32, 2 layers, B={B}, S={S}, C={C}): each scheme "
               f"at {budget:,} rows per entity")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layouts-only", action="store_true", help="only the table-scheme rows")
    add_device_option(
        p,
        "cpu (default) or cuda[:N]: hashing, lookup and training step there "
        "(the table-scheme rows stay on the CPU and are skipped)",
    )
    p.add_argument(
        "--weighted-combine",
        action="store_true",
        help="also time the weighted layout's D-wide path (gather + weighted_combine)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1),
        help="torch threads (default: OMP_NUM_THREADS, else every core)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or process CPU time (less hit by other jobs on a shared machine)",
    )
    args = p.parse_args()
    global CLOCK, DEVICE
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    DEVICE = args.device
    if DEVICE.type != "cpu" and args.layouts_only:
        p.error("--layouts-only runs on the CPU: leave out --device")
    torch.set_num_threads(args.threads)
    n_hash = 200_000 if args.quick else 4_000_000
    n_ids, vocab = (50_000, 100_000) if args.quick else (500_000, 1_000_000)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, device {DEVICE}"
    )
    if not args.layouts_only:
        bench_hashing(n_hash, args.repeats)
        for skew in (True, False):
            bench_table(n_ids, vocab, 64, args.repeats, skew)
    if DEVICE.type != "cpu":
        return  # the table-scheme rows are CPU rows (issue targets are on the 2-core machine)
    bench_layouts(n_ids, vocab // 4, 64, args.repeats, args.weighted_combine)
    bench_layout_ranker(vocab // 4, args.repeats)


if __name__ == "__main__":
    main()
