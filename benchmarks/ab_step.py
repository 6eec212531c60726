"""A change's effect on one training step, measured in one process: old and new code alternate.

    # the packed attention of revision 42f720a against the working tree's
    OMP_NUM_THREADS=1 python benchmarks/ab_step.py --rev 42f720a --module hashrec.nn.varlen \\
        --patch hashrec.nn.transformer:plan_varlen,varlen_isolated_attention

On a shared machine, whole runs of two versions differ by more than most changes (the same
code has measured 5,760-7,758 examples/s). Here the module ``--module`` is loaded a second time
from revision ``--rev`` (``git show``), and the names ``--patch`` lists (in the module that
calls them) are switched between the working tree's objects and the old module's before every
step: the two versions take turns on the same batches, so drifting load hits both alike. The
step is the trainer's (forward, loss, backward, both optimizers) at the CLI's defaults (the demo
config) on the 11 shared days, timed by the process's CPU clock; the table prints both medians
and the median and interquartile range of the per-step ratio new / old.

The old module is executed against the current package (its own imports resolve to today's
modules), so it suits changes inside one module whose interface to the rest did not change.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from demo_inputs import demo_inputs, demo_step

from hashrec.data.collate import batches


def old_module(name: str, rev: str) -> ModuleType:
    """Module ``name`` as it was at git revision ``rev``, loaded beside today's."""
    try:
        current = importlib.import_module(name)
    except ImportError as e:
        raise SystemExit(f"--module {name}: {e}") from e
    root = Path(__file__).resolve().parents[1]
    try:
        path = Path(current.__file__).resolve().relative_to(root)
    except ValueError as e:  # an installed copy, not this checkout's source
        raise SystemExit(
            f"--module {name} is loaded from {current.__file__}, not from this "
            f"checkout ({root}): install it with pip install -e ."
        ) from e
    try:
        source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--rev {rev}: git show {rev}:{path} failed: {e.stderr.strip()}") from e
    alias = f"{name}__{rev}"
    spec = importlib.util.spec_from_loader(alias, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = f"{rev}:{path}"
    sys.modules[alias] = module  # dataclasses look their module up while it executes
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", required=True, help="git revision of the old code")
    p.add_argument("--module", required=True, help="the changed module, e.g. hashrec.nn.varlen")
    p.add_argument("--patch", required=True, action="append",
                   help="MODULE:NAME[,NAME...]: names to switch where they are looked up "
                   "(repeatable); each takes the old module's object of the same name")  # fmt: skip
    p.add_argument("--data", default="../shared/data/kuairand-pure")
    p.add_argument("--batches", type=int, default=40, help="batches of the 11 days, reused")
    p.add_argument("--rounds", type=int, default=4, help="passes over the batches")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    a, train_args = p.parse_known_args()
    torch.set_num_threads(a.threads)
    old = old_module(a.module, a.rev)
    switches = []  # (module, name, new object, old object)
    for item in a.patch:
        target, _, names = item.partition(":")
        try:
            mod = importlib.import_module(target)
        except ImportError as e:
            raise SystemExit(f"--patch {item}: {e}") from e
        for name in filter(None, names.split(",")):
            for m, what in ((mod, target), (old, f"{a.module} at {a.rev}")):
                if not hasattr(m, name):
                    raise SystemExit(f"--patch {item}: {what} has no {name!r}")
            switches.append((mod, name, getattr(mod, name), getattr(old, name)))

    def use(new: bool) -> None:
        for mod, name, now, before in switches:
            setattr(mod, name, now if new else before)

    d = demo_inputs(a.data, train_args)
    spec, train = d.spec, d.train
    order = np.random.default_rng(0).permutation(len(d.requests))
    B = train.batch_size
    lbs = [next(batches(d.log, d.hashes, d.requests, B, order[i * B : (i + 1) * B],
                        trim_candidates=True)) for i in range(a.batches)]  # fmt: skip
    train_step = demo_step(d)

    def step(lb) -> float:
        t0 = time.process_time()
        train_step(lb)
        return time.process_time() - t0

    new_t, old_t = [], []
    for r in range(a.rounds + 1):  # round 0 warms both up
        for lb in lbs:
            use(True)
            t_new = step(lb)
            use(False)
            t_old = step(lb)
            if r:
                new_t.append(t_new)
                old_t.append(t_old)
    use(True)
    new_t, old_t = np.array(new_t), np.array(old_t)
    ratio = new_t / old_t
    q1, med, q3 = np.percentile(ratio, [25, 50, 75])
    names = ", ".join(f"{m.__name__}.{n}" for m, n, _, _ in switches)
    print(
        f"\nOne training step at the demo config ({spec.name}), {a.batches} batches x "
        f"{a.rounds} rounds, torch threads {a.threads}, process CPU clock; switched: {names}\n"
    )
    print("| code | median ms per step |\n|---|---:|")
    print(f"| working tree | {np.median(new_t) * 1e3:.2f} |")
    print(f"| {a.module} at {a.rev} | {np.median(old_t) * 1e3:.2f} |")
    print(f"\nper-step ratio new / old: median {med:.3f} (IQR {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    sys.exit(main())
