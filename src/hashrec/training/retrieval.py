"""Training the two-tower retriever: sampled softmax with in-batch negatives and log-Q correction.

One example per engaged impression on the training days (an impression with any of
``positive_actions``, e.g. long_view): the user's history strictly before it is the query, the
post is the positive, the other positives of the batch are the negatives (the same post is never
its own negative: ``hashrec.models.losses.in_batch_logits``). ``log_q`` is the log of each
post's share of the training positives: in-batch sampling draws a post as a negative in
proportion to it, and subtracting it makes the softmax estimate the full-corpus one (Yi et al.,
RecSys 2019).

The loop is the ranker's (``hashrec.training.loop.EpochTrainer``): the same optimizers (AdamW
dense, row-wise Adagrad table), the same per-epoch seeded order, checkpoints, exact resume,
progress bar and stop on a non-finite loss.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hashrec.data import ExampleConfig, InteractionLog, Requests, RowHashes, batches, build_requests
from hashrec.data.io import sorted_lookup
from hashrec.models.losses import retrieval_loss
from hashrec.models.two_tower import TwoTowerRetriever
from hashrec.training.checkpoint import TrainState
from hashrec.training.distributed import StepLoss, env_world
from hashrec.training.loop import EpochTrainer
from hashrec.training.trainer import TrainConfig

__all__ = [
    "PostLogQ",
    "RetrievalTrainConfig",
    "RetrievalTrainer",
    "positive_rows",
    "retrieval_requests",
]


@dataclass
class RetrievalTrainConfig(TrainConfig):
    """``TrainConfig`` plus what defines a positive and whether to correct for popularity.

    >>> cfg = RetrievalTrainConfig(positive_actions=["click"])
    >>> cfg.positive_actions, cfg.batch_size, cfg.log_q_correction
    (('click',), 256, True)
    """

    batch_size: int = 256  # in-batch negatives: B - 1 per example
    positive_actions: tuple[str, ...] = ("long_view",)
    log_q_correction: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.positive_actions = tuple(self.positive_actions)
        if not self.positive_actions:
            raise ValueError("positive_actions must name at least one action")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if self.order != "shuffled":  # in-batch negatives from one time window: not built
            raise ValueError(f"order {self.order!r}: the retriever trains on shuffled epochs only")


def positive_rows(log: InteractionLog, mask: np.ndarray, actions: tuple[str, ...]) -> np.ndarray:
    """Bool mask: rows in ``mask`` with any of ``actions``; ValueError naming unknown actions."""
    unknown = [a for a in actions if a not in log.actions]
    if unknown:
        raise ValueError(f"positive actions {unknown} are not in the log's actions {log.actions}")
    cols = [log.actions.index(a) for a in actions]
    return mask & (log.labels[:, cols] > 0).any(axis=1)


def retrieval_requests(log: InteractionLog, positives: np.ndarray, history_len: int) -> Requests:
    """One request per positive row: candidates [R, 1] the positive, history strictly before."""
    return build_requests(log, positives, ExampleConfig(history_len, max_candidates=1))


@dataclass
class PostLogQ:
    """log of each post's share of the training positives (posts sorted; unseen -> the floor).

    >>> q = PostLogQ.fit(np.array([5, 5, 7, 5]))
    >>> np.round(np.exp(q(np.array([5, 7]))), 2).tolist()
    [0.75, 0.25]
    """

    posts: np.ndarray
    log_q: np.ndarray
    floor: float

    @classmethod
    def fit(cls, positive_posts: np.ndarray) -> PostLogQ:
        posts, counts = np.unique(positive_posts, return_counts=True)
        total = max(1, int(counts.sum()))
        return cls(posts, np.log(counts / total), math.log(0.5 / total))

    def __call__(self, post_ids: np.ndarray) -> np.ndarray:
        pos, found = sorted_lookup(self.posts, post_ids)
        return np.where(found, self.log_q[pos], self.floor)


class RetrievalTrainer(EpochTrainer):
    """Trains a ``TwoTowerRetriever``; checkpoints to ``run_dir / checkpoint.safetensors``.

    The loop, checkpoints, exact resume and the non-finite stop are ``EpochTrainer``'s (the
    ranker's ``Trainer`` shares them); this class gives the per-step loss (``step_loss``).
    One process only: there is no data-parallel two-tower path.

    >>> import tempfile
    >>> from hashrec import HashConfig, TransformerConfig, TwoTowerConfig, data, datasets
    >>> log = data.load_kuairand(datasets.kuairand_sample_dir())
    >>> cfg = TwoTowerConfig(hash=HashConfig.uniform(num_buckets=1000), actions=log.actions,
    ...     transformer=TransformerConfig(dim=8, num_layers=1, num_q_heads=1, num_kv_heads=1))
    >>> pos = positive_rows(log, log.days(20220425, 20220425), ("long_view",))
    >>> trainer = RetrievalTrainer(TwoTowerRetriever(cfg),
    ...     RetrievalTrainConfig(batch_size=32, max_steps=3), tempfile.mkdtemp(), progress=False)
    >>> state = trainer.fit(log, RowHashes(log, cfg.hash), retrieval_requests(log, pos, 4),
    ...                     PostLogQ.fit(log.post[pos]))
    >>> state.global_step, trainer.checkpoint_path.exists()
    (3, True)
    """

    def __init__(
        self,
        model: TwoTowerRetriever,
        config: RetrievalTrainConfig,
        run_dir: str | Path,
        progress: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        world = env_world()[1]
        if world > 1:  # N copies training independently is not data-parallel training
            raise RuntimeError(
                f"WORLD_SIZE={world}: the two-tower loop runs in one process (multi-process "
                "training covers the ranker); run it without torchrun"
            )
        if config.compile:
            raise ValueError("compile is the ranker's (TrainConfig.compile); the two-tower loop "
                             "does not compile: leave it False")  # fmt: skip
        super().__init__(model, config, run_dir, progress=progress, device=device)

    def fit(
        self,
        log: InteractionLog,
        hashes: RowHashes,
        requests: Requests,
        log_q: PostLogQ | None = None,
    ) -> TrainState:
        """Train on ``requests`` (from ``retrieval_requests``): one positive per request."""
        if requests.candidates.shape[1] != 1:
            raise ValueError(
                f"requests have {requests.candidates.shape[1]} candidates each, expected 1 "
                "(build them with retrieval_requests)"
            )
        if not self.config.log_q_correction:
            log_q = None
        step_loss = functools.partial(self.step_loss, log, hashes, requests, log_q)
        return self.run_epochs(len(requests), step_loss)

    def step_loss(self, log: InteractionLog, hashes: RowHashes, requests: Requests,
                  log_q: PostLogQ | None, indices: np.ndarray) -> StepLoss:  # fmt: skip
        """Sampled-softmax loss of the requests ``indices``: each user against every positive
        of the batch, log-Q corrected when ``log_q`` is given."""
        model: TwoTowerRetriever = self.model  # type: ignore[assignment]
        lb = next(batches(log, hashes, requests, len(indices), indices))
        rows = lb.candidate_rows[:, 0]  # the positive's log row, [B]
        b = lb.batch.to(self.device)
        users = model.embed_users(b)  # [B, D]
        items = model.embed_candidates(
            b.candidate_post_hashes[:, 0], b.candidate_author_hashes[:, 0]
        )  # [B, D]
        keys = torch.from_numpy(log.post[rows]).to(self.device)
        lq = torch.from_numpy(log_q(log.post[rows])).to(self.device) if log_q is not None else None
        loss = retrieval_loss(users, items, model.temperature, keys, lq)
        return StepLoss(loss, float(loss.detach()), len(rows))

    def progress_postfix(self) -> dict[str, str]:
        return {"temp": f"{self.model.temperature.item():.3f}"}
