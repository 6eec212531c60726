"""Where one training step of `hashrec train` goes: data, lookup, reducers, transformer, loss,
backward, optimizers.

    OMP_NUM_THREADS=2 python benchmarks/profile_train.py --data ../shared/data/kuairand-pure
    # on a busy machine: one thread, timed by the process's CPU clock (wall time there
    # measures the neighbours)
    OMP_NUM_THREADS=1 python benchmarks/profile_train.py --threads 1 --clock cpu
    # on a GPU, with the shipped sample (benchmarks/device_check.sh)
    python benchmarks/profile_train.py --device cuda --data src/hashrec/datasets/kuairand_sample

Both paths run: the default (packed) and the padded reference, the same steps on the same
batches. The model, table and examples are the CLI's defaults (the demo config: D = 32, 2
layers, hybrid table at 25% of the full table's bytes, side features), built by the CLI's own
option parser, on the 11 shared days (train 2022-04-25..05-02). The step is the trainer's step,
phase by phase: the forward's parts are timed by wrapping the ranker's sub-modules, so each
phase is what the step itself runs. Steps are timed after ``--warmup`` steps; the table prints
the median time per phase and its share of the step, and examples/s. On a GPU each phase ends
with a device synchronize, so it holds its own kernels' time (the step loses the overlap of
host and device work, which the examples/s of `hashrec train` keep).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from demo_inputs import demo_inputs, demo_step
from options import add_device_option, synchronize

from hashrec.data.collate import batches
from hashrec.models.losses import loss_terms

PHASES = ("data", "lookup", "reducers + side", "transformer + head", "loss", "backward",
          "dense optimizer (AdamW)", "table optimizer (RowWiseAdagrad)")  # fmt: skip


_clock = time.perf_counter  # or time.process_time (--clock cpu)
_device = torch.device("cpu")


def clock() -> float:
    """The clock, after the device's queued work (a no-op on the CPU)."""
    synchronize(_device)
    return _clock()


def ops_profiler(rows: int):
    """torch.profiler over the steps when ``rows`` > 0 (host, and device kernels on a GPU)."""
    if not rows:
        return contextlib.nullcontext()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if _device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts)


def timed(acc: dict[str, list[float]], name: str, fn: Callable) -> Callable:
    """``fn`` that adds its time to ``acc[name]``'s last entry."""

    def wrapper(*args, **kwargs):
        t0 = clock()
        out = fn(*args, **kwargs)
        acc[name][-1] += clock() - t0
        return out

    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/kuairand-pure")
    p.add_argument("--steps", type=int, default=60, help="timed steps")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--history-len", type=int, default=None,
                   help="`hashrec train --history-len` (default: the CLI's, 32)")  # fmt: skip
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the process's CPU time (with --threads 1: the work, whatever else "
                   "runs on the machine)")  # fmt: skip
    add_device_option(p)
    p.add_argument("--ops", type=int, default=0, metavar="N",
                   help="also print the N costliest operators of the packed steps "
                   "(torch.profiler)")  # fmt: skip
    a = p.parse_args()
    global _clock, _device
    _clock = time.process_time if a.clock == "cpu" else time.perf_counter
    _device = a.device
    if a.threads:
        torch.set_num_threads(a.threads)
    extra = [] if a.history_len is None else ["--history-len", str(a.history_len)]
    d = demo_inputs(a.data, extra)
    log, spec, examples, train, hashes, requests = (
        d.log, d.spec, d.examples, d.train, d.hashes, d.requests)  # fmt: skip
    order = np.random.default_rng(0).permutation(len(requests))
    B = train.batch_size
    runs = {}
    for mode in ("packed", "padded"):  # the same steps on the same batches, from the same init
        fresh = demo_step(d, _device)  # its step is timed phase by phase below
        model, dense, table = fresh.model, fresh.dense, fresh.table
        model.pack_tokens = mode == "packed"
        acc: dict[str, list[float]] = defaultdict(list)
        # the forward's phases: every call of these runs inside PhoenixRanker.forward
        model.table.lookup = timed(acc, "lookup", model.table.lookup)
        for name in ("user_reduce", "history_reduce", "candidate_reduce"):
            m = getattr(model, name)
            m.forward = timed(acc, "reducers + side", m.forward)
        model._add_side = timed(acc, "reducers + side", model._add_side)
        n_ex = []
        prof = ops_profiler(a.ops if mode == "packed" else 0)
        with prof:
            for step in range(a.warmup + a.steps):
                for ph in (*PHASES, "step"):
                    acc[ph].append(0.0)
                idx = order[(step * B) % (len(order) - B) :][:B]
                t_step = t0 = clock()
                lb = next(batches(log, hashes, requests, len(idx), idx,
                                  trim_candidates=mode == "packed"))  # fmt: skip
                lb = lb.to(_device)  # the trainer's copy to the device (none on the CPU)
                acc["data"][-1] += clock() - t0
                t0 = clock()
                out = model(lb.batch, side=lb.side)
                fwd = clock() - t0
                t0 = clock()
                loss = loss_terms(out, lb.labels, lb.label_mask, lb.continuous).loss(
                    train.continuous_weight
                )
                acc["loss"][-1] += clock() - t0
                t0 = clock()
                loss.backward()
                acc["backward"][-1] += clock() - t0
                t0 = clock()
                dense.step()
                dense.zero_grad(set_to_none=True)
                acc["dense optimizer (AdamW)"][-1] += clock() - t0
                t0 = clock()
                table.step()
                table.zero_grad(set_to_none=True)
                acc["table optimizer (RowWiseAdagrad)"][-1] += clock() - t0
                # the forward less its timed parts: attention, feed-forward, norms, the head
                parts = acc["lookup"][-1] + acc["reducers + side"][-1]
                acc["transformer + head"][-1] += fwd - parts
                acc["step"][-1] += clock() - t_step
                n_ex.append(int(out.candidate_mask.sum()))
        med = {k: float(np.median(v[a.warmup :])) for k, v in acc.items()}
        runs[mode] = (med, float(np.mean(n_ex[a.warmup :])))
        if a.ops and mode == "packed":
            sort = "self_cuda_time_total" if _device.type == "cuda" else "self_cpu_time_total"
            print(f"\nTop {a.ops} operators of {a.warmup + a.steps} packed steps (by {sort}):")
            print(prof.key_averages().table(sort_by=sort, row_limit=a.ops))
    print(f"\nOne training step of the demo config ({spec.name}, D={spec.transformer.dim}, "
          f"{spec.transformer.num_layers} layers, {B} requests of <= {examples.max_candidates} "
          f"candidates, history {examples.history_len}), torch threads "
          f"{torch.get_num_threads()}, {a.clock} clock, device {_device}; median of {a.steps} "
          f"steps after {a.warmup} warm-up. packed: the default (candidate columns trimmed to "
          "the batch's fullest slate, history reducer and transformer on valid tokens only); "
          "padded: the reference path\n")  # fmt: skip
    print("| phase | packed ms | share | padded ms | share |")
    print("|---|---:|---:|---:|---:|")
    for ph in (*PHASES, "step"):
        cells = [f"{m[ph] * 1e3:.1f} | {m[ph] / m['step']:.0%}" for m, _ in runs.values()]
        print(f"| {ph} | {' | '.join(cells)} |")
    (mp, ep), (mr, er) = runs["packed"], runs["padded"]
    print(
        f"\n{ep:.0f} examples (candidates) per step: packed {ep / mp['step']:,.0f} "
        f"examples/s, padded {er / mr['step']:,.0f} examples/s: "
        f"{mr['step'] / mp['step']:.2f}x"
    )


if __name__ == "__main__":
    main()
