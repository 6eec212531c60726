"""Benchmark: latency of scoring one request through ``PhoenixRanker`` in eval mode.

    python benchmarks/bench_inference.py                 # S=128, C=1000, D=128, fp32 and bf16
    python benchmarks/bench_inference.py --requests 50 --candidates 100
    python benchmarks/bench_inference.py --device cuda   # on a GPU (benchmarks/device_check.sh)

One request = one user's history (S events) and C candidates, the serving shape. Rows: fp32
weights, bf16 weights (table and dense layers), each with the fast isolated kernel, and with
``--ensemble N`` a ``RankerEnsemble`` of N fp32 rankers (what ``hashrec serve --ranker A B C``
runs); p50 / p99 over ``--requests`` timed calls after warm-up, interleaved so drifting load
hits every row. A call's time ends when the probabilities are on the host (on a GPU that
includes the copy back, as a server returns them).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch: see README "Performance"

import numpy as np
import torch
from options import add_device_option

from hashrec import (
    HashConfig,
    PhoenixRanker,
    RankerConfig,
    RankerEnsemble,
    RecsysBatch,
    TransformerConfig,
)


def request(cfg: RankerConfig, S: int, C: int) -> RecsysBatch:
    def rows(e: str, *shape: int) -> torch.Tensor:
        return cfg.hash.rows_torch(e, torch.randint(1, 10**9, shape))

    return RecsysBatch(
        rows("user", 1),
        rows("post", 1, S),
        rows("author", 1, S),
        (torch.rand(1, S, cfg.num_actions) < 0.2).float(),
        torch.zeros(1, S, dtype=torch.long),
        rows("post", 1, C),
        rows("author", 1, C),
        torch.zeros(1, C, dtype=torch.long),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--history", type=int, default=128)
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--attention", choices=("auto", "isolated", "full"), default="auto",
                   help="the attention kernel (TransformerConfig.attention; auto: the model's "
                   "choice for the device and shape)")  # fmt: skip
    add_device_option(p)
    p.add_argument("--ensemble", type=int, default=0, metavar="N",
                   help="also time a RankerEnsemble of N fp32 rankers (0: none)")  # fmt: skip
    p.add_argument("--retain-memory", action="store_true",
                   help="keep freed memory for reuse, as the hashrec command does "
                   "(hashrec.memory.retain_freed_memory); run with and without to "
                   "compare")  # fmt: skip
    args = p.parse_args()
    device = args.device
    if args.ensemble < 0:
        p.error(f"--ensemble must be >= 0, got {args.ensemble}")
    if args.retain_memory:
        from hashrec.memory import retain_freed_memory

        if not retain_freed_memory():
            p.error("--retain-memory needs Linux with glibc")
    torch.manual_seed(0)
    cfg = RankerConfig(
        hash=HashConfig.phoenix(),
        transformer=TransformerConfig(
            dim=args.dim,
            num_layers=args.layers,
            num_q_heads=4,
            num_kv_heads=2,
            attention=args.attention,
        ),
    )
    fp32 = PhoenixRanker(cfg).eval().to(device)
    bf16 = PhoenixRanker(cfg).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(device=device, dtype=torch.bfloat16)
    models = {"fp32 weights": fp32, "bf16 weights": bf16}
    if args.ensemble:
        members = [fp32, *(PhoenixRanker(cfg).eval().to(device) for _ in range(args.ensemble - 1))]
        models[f"fp32, ensemble of {args.ensemble}"] = RankerEnsemble(members).eval()
    batch = request(cfg, args.history, args.candidates).to(device)
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(3):
                m(batch)  # warm-up
        for _ in range(args.requests):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(batch).probs.float().cpu().numpy()
                times[name].append(time.perf_counter() - t0)
        ref = fp32(batch).probs
        err = float((bf16(batch).probs.float() - ref).abs().max())
    shape = (f"S={args.history}, C={args.candidates}, D={args.dim}, {args.layers} layers, "
             f"attention {args.attention}")  # fmt: skip
    kept = ", freed memory retained" if args.retain_memory else ""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}{kept}, device {where}; "
          f"one request: {shape}\n")  # fmt: skip
    print("| weights | p50 ms | p99 ms | candidates/s at p50 | p50 / fp32's |")
    print("|---|---|---|---|---|")
    base = np.percentile(times["fp32 weights"], 50)
    for name, ts in times.items():
        p50, p99 = np.percentile(ts, 50) * 1e3, np.percentile(ts, 99) * 1e3
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {args.candidates / p50 * 1e3:,.0f} | "
              f"{p50 / 1e3 / base:.2f}x |")  # fmt: skip
    print(f"\nbf16 vs fp32 probabilities: max abs difference {err:.4f}")


if __name__ == "__main__":
    main()
