"""Benchmark: whole training steps of the demo config by path, attention kernel and compiling.

    python benchmarks/bench_train_step.py --device cuda              # the shipped sample
    python benchmarks/bench_train_step.py --device cuda --compile default,reduce-overhead
    python benchmarks/bench_train_step.py --data ../shared/data/kuairand-pure --history 32,128

Each row trains a fresh model (the CLI's demo config, same seed) for ``--warmup`` then
``--steps`` steps on the same batches and times the timed steps as a whole (one device
synchronize at the end: host and device work overlap as in ``hashrec train``; the phases are
``profile_train.py``'s). Modes: ``packed`` / ``padded`` (``PhoenixRanker.pack_tokens``) with the
kernel the model chooses (``auto``), or ``_isolated`` / ``_full`` forcing one; ``--compile``
adds a row per ``torch.compile`` mode: the padded path compiled as ``hashrec train --compile``
runs it (its compile time shows in the warm-up column). Ratios are against the first mode.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from demo_inputs import DemoInputs, demo_inputs, demo_step
from options import add_device_option, synchronize

from hashrec.data.collate import batches
from hashrec.datasets import kuairand_sample_dir
from hashrec.nn.attention import full_mask_attention, isolated_attention

KERNELS = {"auto": None, "isolated": isolated_attention, "full": full_mask_attention}
MODES = [f"{p}{'' if k == 'auto' else '_' + k}" for p in ("packed", "padded") for k in KERNELS]


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compile_modes(text: str) -> list[str]:
    modes = [m for m in text.split(",") if m]
    bad = [m for m in modes if m not in COMPILE_MODES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown torch.compile mode(s) {bad}; modes: {', '.join(COMPILE_MODES)}"
        )
    return modes


def _modes(text: str) -> list[str]:
    modes = text.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad}; modes: {', '.join(MODES)}")
    return modes


def time_mode(d: DemoInputs, order: np.ndarray, batch: int, mode: str, steps: int, warmup: int,
              dev: torch.device) -> tuple[float, float, float]:  # fmt: skip
    """Seconds per timed step, examples per timed step and warm-up seconds of one mode."""
    train_step = demo_step(d, dev)
    model, kernel = train_step.model, None
    if mode.startswith("compiled"):
        model.pack_tokens = False
        model.transformer.compile(mode=mode[len("compiled (") : -1])
    else:
        path, _, k = mode.partition("_")
        model.pack_tokens = path == "packed"
        kernel = KERNELS[k or "auto"]

    def step(s: int) -> int:
        idx = order[(s * batch) % (len(order) - batch) :][:batch]
        lb = next(batches(d.log, d.hashes, d.requests, len(idx), idx,
                          trim_candidates=model.pack_tokens)).to(dev)  # fmt: skip
        return int(train_step(lb, kernel).candidate_mask.sum())

    t0 = time.perf_counter()
    for s in range(warmup):
        step(s)
    synchronize(dev)
    warm = time.perf_counter() - t0
    t0, examples = time.perf_counter(), 0
    for s in range(warmup, warmup + steps):
        examples += step(s)
    synchronize(dev)
    return (time.perf_counter() - t0) / steps, examples / steps, warm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="KuaiRand folder (default: the shipped sample)")
    add_device_option(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--history", type=_ints, default=[32], help="history lengths, e.g. 32,128")
    p.add_argument("--batch", type=_ints, default=[128], help="requests per step, e.g. 128,512")
    p.add_argument("--modes", type=_modes, default=["packed", "packed_isolated", "padded"],
                   help=f"comma-separated, of: {', '.join(MODES)}")  # fmt: skip
    p.add_argument("--compile", type=_compile_modes, default=[],
                   help="torch.compile modes to add, e.g. default,"
                   "reduce-overhead (the padded path, as `hashrec train --compile`)")  # fmt: skip
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0:
        p.error(f"need --steps >= 1 and --warmup >= 0, got {a.steps} and {a.warmup}")
    dev = a.device
    data = a.data or kuairand_sample_dir()
    compiled = [f"compiled ({m})" for m in a.compile]

    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads; "
          f"{a.steps} steps timed after {a.warmup}\n")  # fmt: skip
    print("| history | batch | mode | ms/step | examples/s | vs first | warm-up s |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for S in a.history:
        for B in a.batch:
            d = demo_inputs(data, ["--history-len", str(S), "--batch-size", str(B)])
            order = np.random.default_rng(0).permutation(len(d.requests))
            Bt = min(d.train.batch_size, len(order) - 1)
            first = None
            for mode in [*a.modes, *compiled]:
                t, ex, warm = time_mode(d, order, Bt, mode, a.steps, a.warmup, dev)
                first = first or t
                print(f"| {S} | {Bt} | {mode} | {t * 1e3:.1f} | {ex / t:,.0f} | "
                      f"{first / t:.2f}x | {warm:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
