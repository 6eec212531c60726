"""Training the two-tower retriever: sampled softmax with in-batch negatives and log-Q correction.

One example per engaged impression on the training days (an impression with any of
``positive_actions``, e.g. long_view): the user's history strictly before it is the query, the
post is the positive, the other positives of the batch are the negatives (the same post is never
its own negative: ``hashrec.models.losses.in_batch_logits``). ``log_q`` is the log of each
post's share of the training positives: in-batch sampling draws a post as a negative in
proportion to it, and subtracting it makes the softmax estimate the full-corpus one (Yi et al.,
RecSys 2019).

The loop is ``Trainer``'s (``hashrec.training.trainer``): the same optimizers (AdamW dense,
row-wise Adagrad table), the same per-epoch seeded order, checkpoints, resume and progress bar.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from hashrec.data import ExampleConfig, InteractionLog, Requests, RowHashes, batches, build_requests
from hashrec.data.io import sorted_lookup
from hashrec.models.losses import retrieval_loss
from hashrec.models.two_tower import TwoTowerRetriever
from hashrec.training.checkpoint import TrainState
from hashrec.training.distributed import env_world
from hashrec.training.trainer import TrainConfig, Trainer

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


class RetrievalTrainer(Trainer):
    """Trains a ``TwoTowerRetriever``; checkpoints to ``run_dir / checkpoint.safetensors``.

    Construction, ``save`` and ``resume`` are ``Trainer``'s; ``fit`` takes the positives.
    """

    def __init__(
        self,
        model: TwoTowerRetriever,
        config: RetrievalTrainConfig,
        run_dir,
        progress: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        world = env_world()[1]
        if world > 1:  # N copies training independently is not data-parallel training
            raise RuntimeError(
                f"WORLD_SIZE={world}: the two-tower loop runs in one process (multi-process "
                "training covers the ranker); run it without torchrun"
            )
        super().__init__(model, config, run_dir, progress=progress, device=device)  # type: ignore[arg-type]

    def fit(  # type: ignore[override]
        self,
        log: InteractionLog,
        hashes: RowHashes,
        requests: Requests,
        log_q: PostLogQ | None = None,
    ) -> TrainState:
        """Train on ``requests`` (from ``retrieval_requests``): one positive per request."""
        c, st = self.config, self.state
        if requests.candidates.shape[1] != 1:
            raise ValueError(
                f"requests have {requests.candidates.shape[1]} candidates each, expected 1 "
                "(build them with retrieval_requests)"
            )
        use_q = log_q is not None and getattr(c, "log_q_correction", True)
        n_steps = math.ceil(len(requests) / c.batch_size)
        model: TwoTowerRetriever = self.model  # type: ignore[assignment]
        model.train()
        seen, t0 = 0, time.perf_counter()
        for epoch in range(st.epoch, c.epochs):
            perm = np.random.default_rng([c.seed, epoch]).permutation(len(requests))
            start = st.step_in_epoch
            bar = tqdm(total=n_steps, initial=start, desc=f"epoch {epoch + 1}/{c.epochs}",
                       disable=not self.progress, leave=False, dynamic_ncols=True)  # fmt: skip
            stream = batches(log, hashes, requests, c.batch_size, perm[start * c.batch_size :])
            for i, lb in enumerate(stream):
                rows = lb.candidate_rows[:, 0]  # the positive's log row, [B]
                b = lb.batch.to(self.device)
                users = model.embed_users(b)  # [B, D]
                items = model.embed_candidates(
                    b.candidate_post_hashes[:, 0], b.candidate_author_hashes[:, 0]
                )  # [B, D]
                keys = torch.from_numpy(log.post[rows]).to(self.device)
                lq = torch.from_numpy(log_q(log.post[rows])).to(self.device) if use_q else None
                loss = retrieval_loss(users, items, model.temperature, keys, lq)
                loss.backward()
                self.dense.step()
                self.table.step()
                self.dense.zero_grad(set_to_none=True)
                self.table.zero_grad(set_to_none=True)
                seen += len(rows)
                st.record_loss(loss.item())
                st.global_step += 1
                st.step_in_epoch = start + i + 1
                st.examples_per_s = seen / (time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{np.mean(st.losses[-20:]):.4f}", ex_s=f"{st.examples_per_s:,.0f}",
                    temp=f"{model.temperature.item():.3f}",
                )  # fmt: skip
                if st.global_step % c.checkpoint_every == 0:
                    self.save()
                if c.max_steps is not None and st.global_step >= c.max_steps:
                    bar.close()
                    self.save()
                    return st
            bar.close()
            st.epoch, st.step_in_epoch = epoch + 1, 0
            st.done = st.epoch == c.epochs
            self.save()
        return st
