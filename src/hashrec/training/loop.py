"""The epoch loop both trainers share: ``Trainer`` (the ranker) and ``RetrievalTrainer`` (the
two-tower). A trainer says how one global batch of example indices becomes a loss
(``step_loss``: a ``StepLoss``); ``EpochTrainer`` does everything around it:

* AdamW trains the dense weights, ``RowWiseAdagrad`` the hash table (as X does);
* each epoch visits the examples in a permutation seeded by (seed, epoch), and each checkpoint
  holds the torch random state (dropout), restored on resume: a run resumed from a checkpoint
  takes exactly the steps the uninterrupted run takes (one process; under torchrun the order
  is exact and each rank's dropout stream restarts from ``seed + rank``);
* a loss that is not finite stops the run before the optimizer step, so the last good
  checkpoint stays the last checkpoint (``NonFiniteError``); weights that are not finite are
  never written;
* a checkpoint every ``checkpoint_every`` steps and after every epoch; ``max_steps`` stops early
  (the run can be resumed); the loss of every step is kept (``TrainState.losses``);
* with a validation score, the best epoch's weights are kept (``best.safetensors``) and training
  stops after ``patience`` epochs without improvement;
* progress: one bar per epoch with the recent loss and examples/s.

``resume`` refuses a checkpoint written by a run with other settings
(``hashrec.training.resume``). Under torchrun the ranker trains data-parallel
(``hashrec.training.distributed``); rank 0 alone shows progress and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hashrec.nn.optim import RowWiseAdagrad
from hashrec.training import distributed
from hashrec.training.average import WeightAverage
from hashrec.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from hashrec.training.resume import check_resumable

__all__ = ["LR_SCHEDULES", "EpochTrainer", "NonFiniteError", "StepLossFn", "lr_factor",
           "resolve_device"]  # fmt: skip

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning rates' multiplier at ``step`` (0-based) of ``total`` planned steps: 1 for
    "constant"; "linear" and "cosine" fall from 1 at the first step towards 0 after the last.

    >>> [round(lr_factor("linear", s, 4), 3) for s in range(4)]
    [1.0, 0.75, 0.5, 0.25]
    >>> [round(lr_factor("cosine", s, 4), 3) for s in range(4)]
    [1.0, 0.854, 0.5, 0.146]
    """
    if schedule == "constant":
        return 1.0
    p = min(step, total) / max(total, 1)
    if schedule == "linear":
        return 1.0 - p
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


# one global batch of example indices [n] -> its loss (the backward part for this process)
StepLossFn = Callable[[np.ndarray], distributed.StepLoss]


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or weight; the last good checkpoint is kept.

    >>> issubclass(NonFiniteError, RuntimeError)  # callers may catch either
    True
    """


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"cpu" -> CPU; "cuda" (or "cuda:N") only when CUDA is available."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError:  # torch's message lists every device type it knows
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    return dev


def torch_version() -> tuple[int, int]:
    """torch's (major, minor) version, e.g. (2, 13) for "2.13.0+cpu"."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return major, minor


def _fused_adamw(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for ``device`` (CPU: torch 2.4 and later)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch_version() >= (2, 4)


def dense_optimizer(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over the dense parameters; the fused kernel where torch has one: one pass over
    each parameter instead of a dozen small ops, the same update up to rounding (a small
    model's step is mostly per-op overhead)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=_fused_adamw(device) or None)  # fmt: skip


class EpochTrainer:
    """Optimizers, checkpoints, resume and the epoch loop of a model over one fused table.

    ``model`` has a ``table`` (the fused hash table), ``dense_parameters()`` and a ``config``
    with ``to_dict()``; ``config`` is a ``TrainConfig`` (epochs, batch_size, lr, table_lr,
    weight_decay, seed, checkpoint_every, max_steps, patience, dist_timeout_s,
    table_sharding, ema_decay). Subclasses call ``run_epochs`` with their per-step loss.

    >>> import tempfile
    >>> from hashrec import HashConfig, PhoenixRanker, RankerConfig, TransformerConfig
    >>> from hashrec.training.trainer import TrainConfig
    >>> model = PhoenixRanker(RankerConfig(hash=HashConfig.uniform(num_buckets=31),
    ...     transformer=TransformerConfig(dim=8, num_layers=1), actions=("click",),
    ...     continuous_actions=()))
    >>> trainer = EpochTrainer(model, TrainConfig(epochs=2, batch_size=4), tempfile.mkdtemp(),
    ...                        progress=False)
    >>> def step_loss(indices):  # any differentiable loss of the batch's examples
    ...     loss = model.table.weight[torch.from_numpy(indices) + 1].pow(2).sum()
    ...     return distributed.StepLoss(loss, loss.item(), len(indices))
    >>> state = trainer.run_epochs(10, step_loss)  # 10 examples, 3 steps an epoch
    >>> state.global_step, state.done, trainer.checkpoint_path.exists()
    (6, True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        config: Any,
        run_dir: str | Path,
        progress: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        self.ctx = distributed.setup(resolve_device(device), config.dist_timeout_s)
        self.device = self.ctx.device
        self.model, self.config = model.to(self.device), config
        self.parallel = distributed.DataParallel(self.model, self.ctx, config.table_sharding)
        distributed.seed_rank(config.seed, self.ctx)
        self.run_dir = Path(run_dir)
        self.progress = progress and self.ctx.is_main
        self.dense = dense_optimizer(
            model.dense_parameters(), config.lr, config.weight_decay, self.device
        )
        self.table = RowWiseAdagrad(model.table.parameters(), lr=config.table_lr)
        # the dense weights' moving average (``ema_decay`` > 0): what validation scores and the
        # run ends with (``hashrec.training.average``)
        decay = config.ema_decay
        self.average = WeightAverage(model.dense_parameters(), decay) if decay > 0 else None
        self.state = TrainState()
        self.extra: dict = {}  # what the run records beside the training settings (split, data)
        self._saved_step: int | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.safetensors"

    @property
    def best_path(self) -> Path:
        """The best validation epoch's weights (written when validation is on)."""
        return self.run_dir / "best.safetensors"

    def record(self) -> dict:
        """What the checkpoint records about this run: training settings and ``extra``."""
        return {"train": asdict(self.config), **self.extra}

    def _stop(self, what: str) -> NonFiniteError:
        kept = (
            f"the last good checkpoint (step {self._saved_step}) is kept in {self.checkpoint_path}"
            if self._saved_step is not None
            else "no checkpoint was written"
        )
        return NonFiniteError(f"training stopped at step {self.state.global_step + 1}: {what}; "
                              f"{kept}. Lower learning rates may help")  # fmt: skip

    def _rng_state(self) -> dict[str, torch.Tensor]:
        """This process's torch random state (dropout), saved so a resumed run continues it.
        Under torchrun each rank has its own stream and rank 0 writes: nothing is saved."""
        if self.ctx.distributed:
            return {}
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def save(self) -> None:
        """Checkpoint the run; refuses (``NonFiniteError``) weights that are not finite.

        Rank 0 writes; every rank takes part in gathering a sharded table.
        """
        with self.parallel.full_table(self.table):
            for name, p in self.model.named_parameters():
                if not bool(torch.isfinite(p).all()):
                    raise self._stop(f"weight {name} holds NaN or infinite values")
            if self.ctx.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                optimizers = {"dense": self.dense, "table": self.table}
                if self.average is not None:
                    optimizers["average"] = self.average
                save_checkpoint(self.checkpoint_path, self.model, optimizers, self.state,
                                self.record(), rng=self._rng_state())  # fmt: skip
        self._saved_step = self.state.global_step

    def resume(self) -> bool:
        """Load model, optimizers, position and random state from the run's checkpoint; False
        if there is none.

        Refuses a checkpoint whose recorded run differs in a setting that changes training
        (``hashrec.training.resume`` lists the ones that may change).
        """
        if not self.checkpoint_path.exists():
            return False
        model, info = load_checkpoint(self.checkpoint_path, map_location=self.device)
        if info.train_state is None or not {"dense", "table"} <= set(info.optimizers):
            raise ValueError(f"{self.checkpoint_path}: not a training checkpoint (no run state)")
        if info.model_class != type(self.model).__name__:
            raise ValueError(f"{self.checkpoint_path}: holds a {info.model_class}, this run "
                             f"trains a {type(self.model).__name__}")  # fmt: skip
        check_resumable(
            self.checkpoint_path,
            {"model_config": model.config.to_dict(), **info.extra},
            {"model_config": self.model.config.to_dict(), **self.record()},
            asdict(info.train_state),
            self.config.epochs,
        )
        self.model.load_state_dict(model.state_dict())
        self.dense.load_state_dict(info.optimizers["dense"])
        for group in self.dense.param_groups:  # a checkpoint's groups say how it was stepped
            group["fused"] = _fused_adamw(self.device) or None
        self.table.load_state_dict(info.optimizers["table"])
        if self.average is not None:  # check_resumable has held ema_decay equal
            if "average" not in info.optimizers:
                raise ValueError(
                    f"{self.checkpoint_path}: holds no moving average of the weights, which "
                    f"ema_decay {self.average.decay} needs"
                )
            self.average.load_state_dict(info.optimizers["average"])
        if not self.ctx.distributed:  # a checkpoint from an older version has none
            if "cpu" in info.rng:
                torch.set_rng_state(info.rng["cpu"])
            if "cuda" in info.rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(info.rng["cuda"], self.device)
        self.state = info.train_state
        self.state.done = self.state.epoch >= self.config.epochs
        self._saved_step = self.state.global_step
        return True

    def set_lr(self, factor: float) -> None:
        """The dense optimizer at ``factor`` times the configured rate (the schedule). The
        table's row-wise Adagrad keeps its rate: its accumulator already shrinks each row's
        steps, and decaying it too cost like AUC on the study's validation split."""
        for group in self.dense.param_groups:
            group["lr"] = self.config.lr * factor

    def step(self, step_loss: StepLossFn, indices: np.ndarray) -> distributed.StepLoss:
        """One optimisation step on the global batch ``indices``: its loss, checked finite
        before anything changes (all ranks see the same global loss), then backward and both
        optimizers."""
        if self.average is not None:  # a finished run trained on: from the weights it reached
            self.average.resume()
        loss = step_loss(indices)
        if not math.isfinite(loss.value):  # stop before the step spoils the weights (all ranks)
            raise self._stop(f"the loss is {loss.value} (epoch {self.state.epoch + 1})")
        self.parallel.backward(loss.backward)
        self.dense.step()
        self.table.step()
        self.dense.zero_grad(set_to_none=True)
        self.table.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update()
        return loss

    def progress_postfix(self) -> dict[str, str]:
        """More figures for the progress bar (e.g. the retriever's temperature)."""
        return {}

    def epoch_order(self, epoch: int, n_examples: int) -> np.ndarray:
        """The order of epoch ``epoch``: a permutation seeded by (seed, epoch), so a resumed
        run visits the same examples in the same order."""
        return np.random.default_rng([self.config.seed, epoch]).permutation(n_examples)

    def run_epochs(
        self,
        n_examples: int,
        step_loss: StepLossFn,
        validate: Callable[[], float] | None = None,
    ) -> TrainState:
        """Train from the current position to the last epoch (or ``max_steps``).

        Each epoch takes the ``n_examples`` indices in its seeded order, ``batch_size`` at a
        time, through ``step_loss``. ``validate`` (higher is better) scores the model after
        each epoch: the best epoch's weights are kept, training stops after ``patience``
        epochs without improvement and ends with the best weights loaded (and, once the run is
        done, saved in its checkpoint).
        """
        c, st = self.config, self.state
        n_steps = math.ceil(n_examples / c.batch_size)
        planned = c.epochs * n_steps  # the schedule's length (resumed runs: the same steps)
        self.model.train()
        seen, t0 = 0, time.perf_counter()
        for epoch in range(st.epoch, c.epochs):
            if validate is not None and st.best_epoch >= 0:
                if epoch - 1 - st.best_epoch >= c.patience:
                    break  # resumed after the stopping point
            perm = self.epoch_order(epoch, n_examples)
            start = st.step_in_epoch
            order = perm[start * c.batch_size :]
            desc = f"epoch {epoch + 1}/{c.epochs}"
            with tqdm(total=n_steps, initial=start, desc=desc, disable=not self.progress,
                      leave=False, dynamic_ncols=True) as bar:  # fmt: skip
                for i, lo in enumerate(range(0, len(order), c.batch_size)):
                    self.set_lr(lr_factor(c.lr_schedule, st.global_step, planned))
                    loss = self.step(step_loss, order[lo : lo + c.batch_size])
                    seen += loss.examples
                    st.record_loss(loss.value)
                    st.global_step += 1
                    st.step_in_epoch = start + i + 1
                    st.examples_per_s = seen / (time.perf_counter() - t0)
                    bar.update(1)
                    if self.progress:
                        bar.set_postfix(loss=f"{np.mean(st.losses[-20:]):.4f}",
                                        ex_s=f"{st.examples_per_s:,.0f}",
                                        **self.progress_postfix())  # fmt: skip
                    if st.global_step % c.checkpoint_every == 0:
                        self.save()
                    if c.max_steps is not None and st.global_step >= c.max_steps:
                        self.save()
                        return st
            st.epoch, st.step_in_epoch = epoch + 1, 0
            st.done = st.epoch == c.epochs  # the last epoch's checkpoint marks the run done
            stop = False
            if validate is not None:
                with self._averaged():  # the weights the run would keep are the ones scored
                    score = validate()
                    self.model.train()
                    st.validation.append(score)
                    if st.best_epoch < 0 or score > st.validation[st.best_epoch]:
                        st.best_epoch = epoch
                        with self.parallel.full_table(self.table):
                            if self.ctx.is_main:
                                self.run_dir.mkdir(parents=True, exist_ok=True)
                                save_checkpoint(self.best_path, self.model, extra=self.extra)
                stop = epoch - st.best_epoch >= c.patience
                st.done = st.done or stop
            if st.done and validate is None and self.average is not None:
                self.average.finish()  # a finished run ends with the averaged weights
            self.save()
            if stop:
                break
        if validate is not None and self.best_path.exists():
            best, _ = load_checkpoint(self.best_path, map_location=self.device)
            self.model.load_state_dict(best.state_dict())
            if st.done:  # a finished run's checkpoint holds the selected weights
                self.save()
        return st

    def _averaged(self) -> contextlib.AbstractContextManager:
        """The dense weights' moving average in the model inside the block (if there is one)."""
        return self.average.swapped() if self.average is not None else contextlib.nullcontext()
