"""Training loop and prediction for ``PhoenixRanker``.

AdamW trains the dense weights, ``RowWiseAdagrad`` the hash table (as X does). Batches come in a
per-epoch permutation seeded by (seed, epoch), so a run resumed from a checkpoint continues with
exactly the batches it would have seen. Checkpoints: ``hashrec.training.checkpoint``.

Under torchrun the same loop trains data-parallel (``hashrec.training.distributed``): each rank
takes its slice of every global batch, gradients are summed over ranks, and rank 0 alone shows
progress and writes checkpoints, which hold the whole model and load under any process count.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hashrec.data import InteractionLog, Requests, RowHashes, batches
from hashrec.models.losses import loss_terms
from hashrec.models.ranker import PhoenixRanker
from hashrec.nn.optim import RowWiseAdagrad
from hashrec.training import distributed
from hashrec.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from hashrec.training.resume import check_resumable

__all__ = [
    "NonFiniteError",
    "Predictions",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "predict",
    "resolve_device",
    "set_seed",
    "validation_score",
]


@dataclass
class TrainConfig:
    """Optimisation settings (architecture lives in ``RankerConfig``).

    >>> TrainConfig(epochs=1, batch_size=64).table_lr
    0.05
    """

    epochs: int = 2
    batch_size: int = 128  # requests per step (the global batch, split over processes)
    lr: float = 2e-3
    weight_decay: float = 0.01
    table_lr: float = 0.05
    continuous_weight: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500  # steps; a checkpoint is also written after every epoch
    max_steps: int | None = None  # stop early (the run can be resumed)
    # action -> loss weight (default 1); e.g. {"like": 2.0} for a rare action
    action_weights: tuple[tuple[str, float], ...] = ()
    # validation: the last ``val_days`` training days (or, if > 0, the last ``val_fraction`` of
    # the training impressions by time) are held out; after each epoch the model is scored on
    # them, the best epoch's weights are kept and training stops after ``patience`` epochs
    # without improvement. 0 and 0.0: no validation, every epoch trains, the last one is kept.
    val_days: int = 0
    val_fraction: float = 0.0
    patience: int = 1
    dist_timeout_s: float = distributed.DEFAULT_TIMEOUT_S  # a rank silent this long: stop
    table_sharding: str = "auto"  # over processes: distributed.TABLE_SHARDING

    def __post_init__(self) -> None:
        if isinstance(self.action_weights, dict):
            self.action_weights = tuple(self.action_weights.items())
        self.action_weights = tuple((str(a), float(w)) for a, w in self.action_weights)
        if any(w < 0 for _, w in self.action_weights):
            raise ValueError(f"action_weights must be >= 0, got {dict(self.action_weights)}")
        if self.val_days < 0 or not 0.0 <= self.val_fraction < 1.0 or self.patience < 1:
            raise ValueError(
                f"need val_days >= 0, 0 <= val_fraction < 1, patience >= 1; got "
                f"{self.val_days}, {self.val_fraction}, {self.patience}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"need epochs >= 1 and batch_size >= 1, got {self.epochs}, {self.batch_size}"
            )
        for name in ("lr", "table_lr", "weight_decay", "continuous_weight"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0 or (v == 0 and name.endswith("lr")):
                raise ValueError(f"{name} must be a finite number {'>' if 'lr' in name else '>='}"
                                 f" 0, got {v}")  # fmt: skip
        if self.seed < 0 or self.checkpoint_every < 1:
            raise ValueError(f"need seed >= 0 and checkpoint_every >= 1, got {self.seed}, "
                             f"{self.checkpoint_every}")  # fmt: skip
        if self.table_sharding not in distributed.TABLE_SHARDING:
            raise ValueError(
                f"table_sharding must be one of {distributed.TABLE_SHARDING}, "
                f"got {self.table_sharding!r}"
            )
        if not self.dist_timeout_s > 0:
            raise ValueError(f"dist_timeout_s must be > 0 seconds, got {self.dist_timeout_s}")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or weight; the last good checkpoint is kept.

    >>> issubclass(NonFiniteError, RuntimeError)  # callers may catch either
    True
    """


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)  # numpy randomness always goes through seeded Generators


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"cpu" -> CPU; "cuda" (or "cuda:N") only when CUDA is available."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    return dev


class Trainer:
    """Trains a ranker on requests; checkpoints to ``run_dir / checkpoint.safetensors``.

    Under torchrun (``WORLD_SIZE`` > 1) it joins the process group and trains data-parallel.

    >>> import tempfile
    >>> from hashrec.data import ExampleConfig, build_requests, load_kuairand
    >>> from hashrec.datasets import kuairand_sample_dir
    >>> from hashrec.hashing.config import HashConfig
    >>> from hashrec.models.ranker import RankerConfig
    >>> from hashrec.nn.transformer import TransformerConfig
    >>> log = load_kuairand(kuairand_sample_dir())
    >>> cfg = RankerConfig(hash=HashConfig.uniform(num_buckets=1000), actions=log.actions,
    ...     continuous_actions=log.continuous_actions,
    ...     transformer=TransformerConfig(dim=8, num_layers=1, num_q_heads=1, num_kv_heads=1))
    >>> requests = build_requests(log, log.days(20220425, 20220425), ExampleConfig(4, 4))
    >>> trainer = Trainer(PhoenixRanker(cfg), TrainConfig(max_steps=3), tempfile.mkdtemp(),
    ...                   progress=False)
    >>> state = trainer.fit(log, RowHashes(log, cfg.hash), requests)
    >>> state.global_step, trainer.checkpoint_path.exists()
    (3, True)
    """

    def __init__(
        self,
        model: PhoenixRanker,
        config: TrainConfig,
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
        self.dense = torch.optim.AdamW(
            model.dense_parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.table = RowWiseAdagrad(model.table.parameters(), lr=config.table_lr)
        self.state = TrainState()
        self.extra: dict = {}  # what the run records beside the training settings (split, data)
        self._saved_step: int | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.safetensors"

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

    @property
    def best_path(self) -> Path:
        """The best validation epoch's weights (written when validation is on)."""
        return self.run_dir / "best.safetensors"

    @functools.cached_property
    def _action_weights(self) -> torch.Tensor | None:
        """Per-action loss weights [A] on the model's device, built once (read every step)."""
        weights = dict(self.config.action_weights)
        unknown = set(weights) - set(self.model.config.actions)
        if unknown:
            raise ValueError(
                f"action_weights names {sorted(unknown)}, not among the model's actions "
                f"{list(self.model.config.actions)}"
            )
        if not weights:
            return None
        actions = self.model.config.actions
        return torch.tensor([weights.get(a, 1.0) for a in actions], device=self.device)

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
                save_checkpoint(
                    self.checkpoint_path, self.model, optimizers, self.state, self.record()
                )
        self._saved_step = self.state.global_step

    def resume(self) -> bool:
        """Load model, optimizers and position from the run's checkpoint; False if none.

        Refuses a checkpoint whose recorded run differs in a setting that changes training
        (``hashrec.training.resume`` lists the ones that may change).
        """
        if not self.checkpoint_path.exists():
            return False
        model, info = load_checkpoint(self.checkpoint_path, map_location=self.device)
        if info.train_state is None or set(info.optimizers) != {"dense", "table"}:
            raise ValueError(f"{self.checkpoint_path}: not a training checkpoint (no run state)")
        check_resumable(
            self.checkpoint_path,
            {"model_config": model.config.to_dict(), **info.extra},
            {"model_config": self.model.config.to_dict(), **self.record()},
            asdict(info.train_state),
            self.config.epochs,
        )
        self.model.load_state_dict(model.state_dict())
        self.dense.load_state_dict(info.optimizers["dense"])
        self.table.load_state_dict(info.optimizers["table"])
        self.state = info.train_state
        self.state.done = self.state.epoch >= self.config.epochs
        self._saved_step = self.state.global_step
        return True

    def fit(
        self,
        log: InteractionLog,
        hashes: RowHashes,
        requests: Requests,
        validation: Requests | None = None,
    ) -> TrainState:
        """Train from the current position to the end (or ``max_steps``); with ``validation``,
        score it after each epoch, keep the best epoch's weights (``best.safetensors``), stop
        after ``patience`` epochs without improvement and end with the best weights loaded (and,
        once the run is done, saved in its checkpoint)."""
        self.parallel.begin(self.table)  # shard the table, when it is sharded
        state = self._fit(log, hashes, requests, validation)
        self.parallel.end(self.table)
        return state

    def train_step(self, log: InteractionLog, hashes: RowHashes, requests: Requests,
                   indices: np.ndarray) -> distributed.StepLoss:  # fmt: skip
        """One optimisation step on the global batch ``requests[indices]`` (this rank's slice)."""
        self.parallel.begin(self.table)  # no-op once begun (or with nothing to shard)
        mine, weight = self.parallel.local_requests(indices)
        lb = next(batches(log, hashes, requests, len(mine), mine)).to(self.device)
        out = self.parallel(lb.batch, side=lb.side)
        terms = loss_terms(out, lb.labels, lb.label_mask, lb.continuous, self._action_weights)
        examples = int(out.candidate_mask.sum())
        loss = distributed.global_loss(
            terms, self.config.continuous_weight, examples, self.ctx, weight
        )
        if not math.isfinite(loss.value):  # stop before the step spoils the weights (all ranks)
            raise self._stop(f"the loss is {loss.value} (epoch {self.state.epoch + 1})")
        self.parallel.backward(loss.backward)
        self.dense.step()
        self.table.step()
        self.dense.zero_grad(set_to_none=True)
        self.table.zero_grad(set_to_none=True)
        return loss

    def _fit(
        self,
        log: InteractionLog,
        hashes: RowHashes,
        requests: Requests,
        validation: Requests | None,
    ) -> TrainState:
        c, st = self.config, self.state
        if validation is not None and self.ctx.world > 1:
            raise ValueError(
                "a validation split (early stopping) runs in one process only for now; under "
                "torchrun or --nproc pass --val-days 0 (TrainConfig(val_days=0, val_fraction=0))"
            )
        n_steps = math.ceil(len(requests) / c.batch_size)
        self.model.train()
        seen, t0 = 0, time.perf_counter()
        for epoch in range(st.epoch, c.epochs):
            if validation is not None and st.best_epoch >= 0:
                if epoch - 1 - st.best_epoch >= c.patience:
                    break  # resumed after the stopping point
            perm = np.random.default_rng([c.seed, epoch]).permutation(len(requests))
            start = st.step_in_epoch
            bar = tqdm(total=n_steps, initial=start, desc=f"epoch {epoch + 1}/{c.epochs}",
                       disable=not self.progress, leave=False, dynamic_ncols=True)  # fmt: skip
            order = perm[start * c.batch_size :]
            for i, lo in enumerate(range(0, len(order), c.batch_size)):
                try:
                    loss = self.train_step(log, hashes, requests, order[lo : lo + c.batch_size])
                except NonFiniteError:
                    bar.close()
                    raise
                seen += loss.examples
                st.record_loss(loss.value)
                st.global_step += 1
                st.step_in_epoch = start + i + 1
                st.examples_per_s = seen / (time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{np.mean(st.losses[-20:]):.4f}", ex_s=f"{st.examples_per_s:,.0f}"
                )
                if st.global_step % c.checkpoint_every == 0:
                    self.save()
                if c.max_steps is not None and st.global_step >= c.max_steps:
                    bar.close()
                    self.save()
                    return st
            bar.close()
            st.epoch, st.step_in_epoch = epoch + 1, 0
            st.done = st.epoch == c.epochs  # the last epoch's checkpoint marks the run done
            stop = False
            if validation is not None:
                score = validation_score(log, predict(self.model, log, hashes, validation))
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
            self.save()
            if stop:
                break
        if validation is not None and self.best_path.exists():
            best, _ = load_checkpoint(self.best_path, map_location=self.device)
            self.model.load_state_dict(best.state_dict())
            if st.done:  # a finished run's checkpoint holds the selected weights
                self.save()
        return st


def validation_score(
    log: InteractionLog, predictions: Predictions, min_positives: int = 50
) -> float:
    """Mean AUC over the actions with >= ``min_positives`` positives among the predicted rows
    (every action if none has that many): what early stopping maximises."""
    from hashrec.evaluation.metrics import auc

    y = log.labels[predictions.rows]
    pos = y.sum(0)
    use = np.flatnonzero(pos >= min_positives)
    if len(use) == 0:
        use = np.flatnonzero((pos > 0) & (pos < len(y)))
    if len(use) == 0:
        return 0.0
    return float(np.mean([auc(y[:, a], predictions.probs[:, a]) for a in use]))


@dataclass
class Predictions:
    """Probabilities of every real candidate of some requests.

    rows [n] log row of each candidate; requests [n] index of its request; probs [n, A].

    >>> p = Predictions(rows=np.array([4, 9]), requests=np.array([0, 0]),
    ...                 probs=np.array([[0.2], [0.7]]))
    >>> int(p.rows[p.probs[:, 0].argmax()])  # the log row predicted most likely
    9
    """

    rows: np.ndarray
    requests: np.ndarray
    probs: np.ndarray


@torch.no_grad()
def predict(
    model: PhoenixRanker,
    log: InteractionLog,
    hashes: RowHashes,
    requests: Requests,
    batch_size: int = 512,
) -> Predictions:
    """Probabilities of every real candidate, computed on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    rows, reqs, probs = [], [], []
    offset = 0
    for lb in batches(log, hashes, requests, batch_size):
        lb = lb.to(device)
        p = model(lb.batch, side=lb.side).probs.float().cpu().numpy()
        cand_rows = lb.candidate_rows
        keep = cand_rows >= 0
        rows.append(cand_rows[keep])
        reqs.append(
            (np.arange(len(cand_rows))[:, None] + offset).repeat(cand_rows.shape[1], 1)[keep]
        )
        probs.append(p[keep])
        offset += len(cand_rows)
    return Predictions(np.concatenate(rows), np.concatenate(reqs), np.concatenate(probs))
