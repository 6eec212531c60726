"""Training and prediction for ``PhoenixRanker``: the ranker's per-step loss and validation
score on the shared epoch loop (``hashrec.training.loop``: optimizers, seeded per-epoch order,
checkpoints, exact resume, progress, the non-finite stop). Checkpoints:
``hashrec.training.checkpoint``.

Under torchrun the same loop trains data-parallel (``hashrec.training.distributed``): each rank
takes its slice of every global batch, gradients are summed over ranks, and rank 0 alone shows
progress and writes checkpoints, which hold the whole model and load under any process count.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from hashrec.data import InteractionLog, Requests, RowHashes, batches
from hashrec.models.losses import loss_terms, pairwise_terms
from hashrec.models.ranker import PhoenixRanker
from hashrec.training import distributed
from hashrec.training.checkpoint import TrainState
from hashrec.training.loop import (
    LR_SCHEDULES,
    EpochTrainer,
    NonFiniteError,
    resolve_device,
    torch_version,
)

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


# the orders an epoch may visit the requests in (TrainConfig.order; the CLI's --order)
ORDERS = ("shuffled", "time")


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
    # weight of ``pairwise_loss`` over each user's candidates (0: off); > 0 also orders every
    # epoch user by user, so a batch holds whole users and their pairs
    pairwise_weight: float = 0.0
    # validation: the last ``val_days`` training days (or, if > 0, the last ``val_fraction`` of
    # the training impressions by time) are held out; after each epoch the model is scored on
    # them, the best epoch's weights are kept and training stops after ``patience`` epochs
    # without improvement. 0 and 0.0: no validation, every epoch trains, the last one is kept.
    val_days: int = 0
    val_fraction: float = 0.0
    patience: int = 1
    # after validation has chosen the epoch count (the best epoch), train a fresh model with the
    # same seed on every training row, the validation rows included, for that many epochs
    # (``hashrec.evaluation.experiment.run_model``): the held-out days are the most recent
    refit: bool = False
    dist_timeout_s: float = distributed.DEFAULT_TIMEOUT_S  # a rank silent this long: stop
    table_sharding: str = "auto"  # over processes: distributed.TABLE_SHARDING
    # the dense (AdamW) learning rate over the planned steps (``epochs`` x steps per epoch):
    # "constant", or decaying to 0 by the last step, "linear" or "cosine" (``lr_factor``); the
    # table's row-wise Adagrad keeps ``table_lr``. A decaying run resumes only with the same
    # epochs; ``refit`` decays over the epochs validation chose (early stopping may have cut
    # the validated run's decay short)
    lr_schedule: str = "constant"
    # the order each epoch visits the requests: "shuffled" (seeded by (seed, epoch)) or "time"
    # (by request time, oldest first, as a model trained on a stream sees them: the last steps
    # are the most recent days)
    order: str = "shuffled"
    # > 0: keep an exponential moving average of the dense weights with this decay (ramped up
    # over the first steps as TensorFlow's ``ExponentialMovingAverage`` does); validation scores
    # it and a finished run ends with it (``hashrec.training.average``; a run stopped by
    # ``max_steps`` is not finished and keeps the weights it reached). 0: off
    ema_decay: float = 0.0
    # compile the transformer (``torch.compile``, in place: the checkpoint's names do not change)
    # and run it on padded tokens with every candidate column, so a step's shapes are fixed. For
    # long GPU runs: H200, demo config, 1.3-1.5x the steps per second once compiled, ~30 s of
    # compiling per run (the first step, an epoch's smaller last batch, evaluation); on a CPU
    # slower than the default packed path. One process only for now
    compile: bool = False

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got "
                             f"{self.lr_schedule!r}")  # fmt: skip
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
        if self.refit and self.val_days == 0 and self.val_fraction == 0.0:
            raise ValueError("refit needs a validation split to choose the epoch count "
                             "(val_days or val_fraction > 0)")  # fmt: skip
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"need epochs >= 1 and batch_size >= 1, got {self.epochs}, {self.batch_size}"
            )
        for name in ("lr", "table_lr", "weight_decay", "continuous_weight", "pairwise_weight"):
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
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no moving average), got "
                             f"{self.ema_decay}")  # fmt: skip
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.order == "time" and self.pairwise_weight > 0:
            raise ValueError("order 'time' (--order time) cannot hold each user's requests "
                             "together, which pairwise_weight > 0 (--pairwise-weight) needs: use "
                             "order 'shuffled'")  # fmt: skip


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)  # numpy randomness always goes through seeded Generators


class Trainer(EpochTrainer):
    """Trains a ranker on requests; checkpoints to ``run_dir / checkpoint.safetensors``.

    ``Trainer(model: PhoenixRanker, config: TrainConfig, run_dir, progress=True, device=None)``.
    The loop, checkpoints and resume are ``EpochTrainer``'s; this class gives the ranker's
    per-step loss (``step_loss``) and its validation score. Under torchrun (``WORLD_SIZE`` > 1)
    it joins the process group and trains data-parallel.

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
        if validation is not None and self.ctx.world > 1:
            raise ValueError(
                "a validation split (early stopping) runs in one process only for now; under "
                "torchrun or --nproc pass --val-days 0 (TrainConfig(val_days=0, val_fraction=0))"
            )
        if self.config.compile:
            self._compile()
        self.parallel.begin(self.table)  # shard the table, when it is sharded
        validate = None
        if validation is not None:
            validate = functools.partial(self.validation_score, log, hashes, validation)
        step_loss = functools.partial(self.step_loss, log, hashes, requests)
        self._request_users = log.user[requests.user_row]
        self._request_times = log.time[requests.candidates[:, 0]]  # its first impression
        state = self.run_epochs(len(requests), step_loss, validate)
        self.parallel.end(self.table)
        return state

    def _compile(self) -> None:
        """``TrainConfig.compile``: the padded path (fixed shapes) and a compiled transformer."""
        if self.ctx.world > 1:
            raise ValueError("compile (--compile) runs in one process only for now: train "
                             "without --nproc or torchrun, or without compile")  # fmt: skip
        # not tried before 2.5, whose dynamo guarded modules by identity (inlining built-in
        # modules became its default in 2.5): every seed's model could compile anew until the
        # cache limit, then run eager and padded, slower than not compiling
        if torch_version() < (2, 5):
            raise ValueError(f"compile (--compile) needs torch >= 2.5, this is "
                             f"{torch.__version__}")  # fmt: skip
        self.model.pack_tokens = False
        if getattr(self.model.transformer, "_compiled_call_impl", None) is None:
            self.model.transformer.compile()

    def validation_score(self, log: InteractionLog, hashes: RowHashes,
                         validation: Requests) -> float:  # fmt: skip
        """What early stopping maximises: ``validation_score`` of the model's predictions."""
        return validation_score(log, predict(self.model, log, hashes, validation))

    def train_step(self, log: InteractionLog, hashes: RowHashes, requests: Requests,
                   indices: np.ndarray) -> distributed.StepLoss:  # fmt: skip
        """One optimisation step on the global batch ``requests[indices]`` (this rank's slice)."""
        return self.step(functools.partial(self.step_loss, log, hashes, requests), indices)

    def step_loss(self, log: InteractionLog, hashes: RowHashes, requests: Requests,
                  indices: np.ndarray) -> distributed.StepLoss:  # fmt: skip
        """The loss of the global batch ``requests[indices]``: this rank's slice, forward,
        masked per-action losses (``loss_terms``) summed over ranks."""
        self.parallel.begin(self.table)  # no-op once begun (or with nothing to shard)
        w = self.config.pairwise_weight
        request_users = log.user[requests.user_row[indices]] if w > 0 else None  # kept whole
        mine, weight = self.parallel.local_requests(indices, request_users)
        trim = not self.config.compile  # compiled: every candidate column, fixed shapes
        lb = next(batches(log, hashes, requests, len(mine), mine, trim_candidates=trim))
        lb = lb.to(self.device)
        out = self.parallel(lb.batch, side=lb.side)
        terms = loss_terms(out, lb.labels, lb.label_mask, lb.continuous, self._action_weights)
        examples = int(out.candidate_mask.sum())
        loss = distributed.global_loss(
            terms, self.config.continuous_weight, examples, self.ctx, weight
        )
        if w > 0:  # each user's pairs on one rank (a user's requests are contiguous)
            rows = lb.candidate_rows
            users = np.where(rows >= 0, log.user[np.maximum(rows, 0)], -1)
            mask = out.candidate_mask[..., None] & lb.label_mask
            total, n = pairwise_terms(out.logits, lb.labels, mask,
                                      torch.from_numpy(users).to(out.logits.device))  # fmt: skip
            pair, value = distributed.global_mean(total, n, self.ctx, weight)  # over all pairs
            loss = distributed.StepLoss(loss.backward + w * pair, loss.value + w * value,
                                        loss.examples)  # fmt: skip
        return loss

    def epoch_order(self, epoch: int, n_examples: int) -> np.ndarray:
        """Seeded by (seed, epoch) as the plain permutation; with ``pairwise_weight`` > 0 the
        users come in a random order and each user's requests together (in random order), so
        a batch holds whole users and the pairwise term sees their candidates side by side.
        With ``order="time"``: by each request's time, every epoch the same."""
        times = getattr(self, "_request_times", None)
        if self.config.order == "time" and times is not None and len(times) == n_examples:
            return np.argsort(times, kind="stable")
        rng = np.random.default_rng([self.config.seed, epoch])
        users = getattr(self, "_request_users", None)
        if self.config.pairwise_weight <= 0 or users is None or len(users) != n_examples:
            return rng.permutation(n_examples)
        uniq, inv = np.unique(users, return_inverse=True)
        user_rank = rng.permutation(len(uniq))[inv]
        return np.lexsort((rng.random(n_examples), user_rank))


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
