"""Tensor operations of one ranker training step, forward per module and backward per op.

At the demo config a step is mostly fixed per-operation cost (tensors of D = 32), so the number
of operations predicts its time better than its FLOPs. Counted with a ``TorchDispatchMode`` on
one batch of ``--batch-size`` requests from the bundled KuaiRand sample (or ``--data``):

    python benchmarks/count_ops.py            # the CLI's defaults
    python benchmarks/count_ops.py --history-len 128
"""

from __future__ import annotations

import argparse
import collections
import sys

import numpy as np
import torch
from demo_inputs import demo_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from hashrec.data.collate import batches
from hashrec.datasets import kuairand_sample_dir
from hashrec.evaluation.experiment import ranker_config
from hashrec.models.losses import loss_terms
from hashrec.models.ranker import PhoenixRanker


class _Count(TorchDispatchMode):
    """Counts every aten op, keyed by the module on top of ``stack``."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.by_module: collections.Counter = collections.Counter()
        self.ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        key = self.stack[-1]
        self.by_module[key] += 1
        self.ops[key][str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="KuaiRand folder (default: the bundled sample)")
    p.add_argument("--top", type=int, default=12, help="modules to list")
    args, train_args = p.parse_known_args()
    torch.set_num_threads(1)
    d = demo_inputs(args.data or kuairand_sample_dir(), train_args)
    log, spec, train, hashes, requests = d.log, d.spec, d.train, d.hashes, d.requests
    idx = np.random.default_rng(0).permutation(len(requests))[: train.batch_size]
    torch.manual_seed(0)
    model = PhoenixRanker(ranker_config(log, spec))
    model.train()
    stack = ["<top>"]
    for name, m in model.named_modules():
        m.register_forward_pre_hook(lambda mod, inp, name=name: stack.append(name or "<model>"))
        m.register_forward_hook(lambda mod, inp, out: stack.pop() and None)
    lb = next(batches(log, hashes, requests, len(idx), idx, trim_candidates=True))
    with _Count(stack) as fwd:
        out = model(lb.batch, side=lb.side)
        stack.append("<loss>")
        loss = loss_terms(out, lb.labels, lb.label_mask, lb.continuous)
        loss = loss.loss(train.continuous_weight)
        stack.pop()
    with _Count(["<backward>"]) as bwd:
        loss.backward()
    print(f"one step of {len(idx)} requests ({int((lb.candidate_rows >= 0).sum())} candidates): "
          f"{sum(fwd.by_module.values()):,} forward and {sum(bwd.by_module.values()):,} backward "
          "aten operations")  # fmt: skip
    print("\n| module (forward) | operations | most frequent |\n|---|---:|---|")
    for k, v in fwd.by_module.most_common(args.top):
        common = ", ".join(f"{op} {n}" for op, n in fwd.ops[k].most_common(4))
        print(f"| {k} | {v} | {common} |")
    common = ", ".join(f"{op} {n}" for op, n in bwd.ops["<backward>"].most_common(8))
    print(f"\nbackward, most frequent: {common}")


if __name__ == "__main__":
    sys.exit(main())
