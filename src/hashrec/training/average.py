"""An exponential moving average of the dense weights, the weights a run validates and keeps.

After every optimizer step ``update`` moves each average towards its weight by ``1 - d`` with
``d = min(decay, (1 + n) / (10 + n))`` at the n-th update: TensorFlow's
``ExponentialMovingAverage(decay, num_updates)``, whose ramp keeps the first steps' weights from
lingering in the average (without it, 0.998 ** 578 = 31% of the average is still the
initialisation after the study's first epoch). Only the dense weights are averaged: their update
is a few dozen small tensors, where a table of millions of rows would be a full pass over it per
step; the table's rows stay the optimizer's.

``swapped()`` puts the averages in the model's parameters (and the weights aside) for as long as
the block runs: validation scores, and best-epoch checkpoints hold, the averaged weights, while
training continues from its own. ``finish()`` makes that swap last (a run that ends with the
averages) and ``resume()`` undoes it: the weights training reached stay in the average's slots,
so a finished run continued for more epochs goes on from them, as a straight run would.
``state_dict`` / ``load_state_dict`` follow the optimizers' form (and record a finished swap), so
a checkpoint stores the averages beside them and a resumed run continues them exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["WeightAverage"]


class WeightAverage:
    """The moving average of ``params`` with decay ``decay`` (0 <= decay < 1).

    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> avg = WeightAverage([w], decay=0.5)
    >>> with torch.no_grad():
    ...     _ = w.fill_(4.0)
    >>> avg.update()  # first update: d = min(0.5, 2 / 11)
    >>> avg.average[0]
    tensor([3.2727, 3.2727])
    >>> with avg.swapped():
    ...     w.tolist()
    [3.2727272510528564, 3.2727272510528564]
    >>> w.tolist()
    [4.0, 4.0]
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the moving average's decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = float(decay)
        self.updates = 0
        self.average = [p.detach().clone() for p in self.params]
        self._swapped = False  # inside swapped()
        self.finished = False  # after finish(): the parameters hold the averages until resume()

    def current_decay(self) -> float:
        """The decay the next update uses (the ramp, then ``decay``)."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Move every average towards its parameter (call after each optimizer step)."""
        if self._swapped or self.finished:
            raise RuntimeError("update() while the parameters hold the averages (swapped() or "
                               "finish(); resume() first)")  # fmt: skip
        weight = 1.0 - self.current_decay()
        for a, p in zip(self.average, self.params, strict=True):
            a.lerp_(p.detach(), weight)
        self.updates += 1

    @torch.no_grad()
    def _swap(self) -> None:
        for a, p in zip(self.average, self.params, strict=True):
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The averages in the parameters inside the block; the weights back after it."""
        if self._swapped or self.finished:
            raise RuntimeError("swapped() while the parameters already hold the averages")
        self._swap()
        self._swapped = True
        try:
            yield
        finally:
            self._swap()
            self._swapped = False

    def finish(self) -> None:
        """The averages in the parameters until ``resume()`` (the end of a run); the weights
        training reached wait in the average's slots. Nothing to do when already finished."""
        if self._swapped:
            raise RuntimeError("finish() inside swapped()")
        if not self.finished:
            self._swap()
            self.finished = True

    def resume(self) -> None:
        """Undo ``finish()``: the weights training reached back in the parameters, the averages
        in their slots, to train on. Nothing to do when not finished."""
        if self.finished:
            self._swap()
            self.finished = False

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {i: {"average": tensor}}, "param_groups": [{"decay", "updates",
        "finished"}]}``, the optimizers' form (``hashrec.training.checkpoint`` stores it as one
        of them). After ``finish()`` the slots hold the weights training reached."""
        if self._swapped:
            raise RuntimeError("state_dict() inside swapped(): the averages are in the model")
        return {
            "state": {i: {"average": a} for i, a in enumerate(self.average)},
            "param_groups": [
                {"decay": self.decay, "updates": self.updates, "finished": self.finished}
            ],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; refuses another parameter list or decay."""
        saved = state.get("state", {})
        if len(saved) != len(self.average) or any(
            "average" not in saved.get(i, {}) or saved[i]["average"].shape != a.shape
            for i, a in enumerate(self.average)
        ):
            shapes = [tuple(saved[i]["average"].shape) if "average" in saved[i] else None
                      for i in sorted(saved)]  # fmt: skip
            raise ValueError(
                f"the checkpoint's moving average holds {len(saved)} tensors {shapes}, expected "
                f"{len(self.average)} {[tuple(a.shape) for a in self.average]}"
            )
        group = state["param_groups"][0]
        if float(group["decay"]) != self.decay:
            raise ValueError(f"the checkpoint's moving average has decay {group['decay']}, "
                             f"this run {self.decay}")  # fmt: skip
        if self._swapped:
            raise RuntimeError("load_state_dict() inside swapped()")
        for i, a in enumerate(self.average):
            a.copy_(saved[i]["average"])
        self.updates = int(group["updates"])
        self.finished = bool(group.get("finished", False))  # the model holds the averages
