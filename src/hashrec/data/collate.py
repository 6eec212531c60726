"""Requests -> hashed ``RecsysBatch``es (hashing happens here, as in Phoenix's loader)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from hashrec.data.io import sorted_lookup
from hashrec.data.requests import Requests
from hashrec.data.schema import InteractionLog
from hashrec.hashing.config import EntityHash, HashConfig
from hashrec.nn.batch import BATCH_FIELDS, RecsysBatch
from hashrec.nn.side import SideBatch

__all__ = ["LabelledBatch", "RowHashes", "batches", "collision_free_config", "dense_ids"]


def collision_free_config(log: InteractionLog, reserved_rows: int = 64) -> tuple[HashConfig, dict]:
    """One row per distinct ID (the 'full table' baseline): identity hashing of dense IDs.

    Returns the config and ``{entity: sorted raw IDs}``; ``dense_ids`` maps raw -> 1..n.
    """
    vocab = {
        "user": np.unique(log.user),
        "post": np.unique(log.post),
        "author": np.unique(log.author),
    }
    if log.side.num_fields:  # categorical side values: one row each too
        values = np.unique(np.concatenate([log.side.user_cat.ravel(), log.side.post_cat.ravel()]))
        vocab["feature"] = values[values != 0]
    ents = tuple(EntityHash(name, 1, len(v) + 1, "identity") for name, v in vocab.items())
    return HashConfig(entities=ents, reserved_rows=reserved_rows), vocab


def dense_ids(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Raw IDs -> 1..len(vocab) by position in the sorted vocabulary (0 stays 0)."""
    pos, found = sorted_lookup(vocab, ids)
    if not found[ids != 0].all():
        raise ValueError("dense_ids: an ID is missing from the vocabulary")
    return np.where(ids == 0, 0, pos + 1)


class RowHashes:
    """Fused-table rows of every log row's user, post and author, hashed once; and of its
    categorical side values (``user_features`` [n, Fu, K], ``post_features`` [n, Fp, K]) when
    the config has a ``feature`` entity.

    >>> import numpy as np
    >>> log = InteractionLog(
    ...     user=np.array([1, 1, 2, 1]), post=np.array([10, 11, 10, 12]),
    ...     author=np.array([5, 6, 5, 6]), surface=np.zeros(4, dtype=np.int64),
    ...     time=np.array([0, 1000, 2000, 9000]), day=np.full(4, 20220425),
    ...     labels=np.array([[1], [0], [1], [1]], dtype=np.uint8),
    ...     continuous=np.zeros((4, 0), dtype=np.float32), actions=("click",))
    >>> hashes = RowHashes(log, HashConfig.uniform(num_buckets=101))
    >>> hashes.post.shape  # [rows, k]
    (4, 2)
    """

    def __init__(self, log: InteractionLog, config: HashConfig, vocab: dict | None = None):
        def ids(entity: str, raw: np.ndarray) -> np.ndarray:
            return dense_ids(vocab[entity], raw) if vocab is not None else raw

        self.config = config
        self.user = config.rows("user", ids("user", log.user))
        self.post = config.rows("post", ids("post", log.post))
        self.author = config.rows("author", ids("author", log.author))
        n = len(log)
        has = "feature" in config and log.side.num_fields > 0
        K = config["feature"].num_hashes if has else 1
        self.user_features = np.zeros((n, log.side.user_cat.shape[1], K), np.int64)
        self.post_features = np.zeros((n, log.side.post_cat.shape[1], K), np.int64)
        if has:
            self.user_features = config.rows("feature", ids("feature", log.side.user_cat))
            self.post_features = config.rows("feature", ids("feature", log.side.post_cat))


def _gather(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """table[idx] with -1 -> zeros."""
    out = table[np.maximum(idx, 0)]
    out[idx < 0] = 0
    return out


@dataclass
class LabelledBatch:
    """A hashed batch with its targets.

    labels [B, C, A] float 0/1; label_mask [B, C, A] bool (False: no loss); continuous
    [B, C, Ac] float; candidate_rows [B, C] int64 numpy, the log row of each candidate (-1 for
    padding and sampled negatives); side: the side features, when the log has any.

    >>> import numpy as np
    >>> log = InteractionLog(
    ...     user=np.array([1, 1, 2, 1]), post=np.array([10, 11, 10, 12]),
    ...     author=np.array([5, 6, 5, 6]), surface=np.zeros(4, dtype=np.int64),
    ...     time=np.array([0, 1000, 2000, 9000]), day=np.full(4, 20220425),
    ...     labels=np.array([[1], [0], [1], [1]], dtype=np.uint8),
    ...     continuous=np.zeros((4, 0), dtype=np.float32), actions=("click",))
    >>> from hashrec.data.requests import ExampleConfig, build_requests
    >>> req = build_requests(log, log.time > 0, ExampleConfig(history_len=2, max_candidates=2))
    >>> lb = next(batches(log, RowHashes(log, HashConfig.uniform(101)), req, batch_size=2))
    >>> lb.labels.shape == lb.label_mask.shape == (*lb.batch.candidate_post_hashes.shape[:2], 1)
    True
    """

    batch: RecsysBatch
    labels: torch.Tensor
    label_mask: torch.Tensor
    continuous: torch.Tensor
    candidate_rows: np.ndarray
    side: SideBatch | None = None

    def to(self, device: torch.device | str) -> LabelledBatch:
        """Tensors moved to ``device`` (the rows stay in numpy on the host)."""
        return LabelledBatch(self.batch.to(device), self.labels.to(device),
                             self.label_mask.to(device), self.continuous.to(device),
                             self.candidate_rows,
                             self.side.to(device) if self.side is not None else None)  # fmt: skip


def batches(
    log: InteractionLog,
    hashes: RowHashes,
    requests: Requests,
    batch_size: int,
    order: np.ndarray | None = None,
    trim_candidates: bool = True,
) -> Iterator[LabelledBatch]:
    """Yield ``LabelledBatch``es of ``batch_size`` requests, in ``order`` (default: as given).

    ``trim_candidates``: keep only as many candidate columns as the batch's fullest slate
    (False: every batch has ``max_candidates`` columns, the padded reference).

    Candidates are the real impressions then the sampled negatives; on a sampled negative every
    label is 0 and negative-feedback actions carry no loss (it was never shown, so it cannot
    have been hated). ``candidate rows`` [B, C] maps predictions back to log rows (-1 otherwise).
    """
    idx_all = np.arange(len(requests)) if order is None else order
    neg_cols = np.array([a in log.negative_actions for a in log.actions])
    for lo in range(0, len(idx_all), batch_size):
        r = requests.take(idx_all[lo : lo + batch_size])
        # Most slates hold one or two impressions, so the batch keeps the candidate columns up
        # to the last one any slate uses. Exact with shared candidate positions (the default):
        # a candidate's score never depends on the other candidates or on how many slots there
        # are. (With Phoenix's per-slot positions, sampled negatives move to lower slots.)
        if trim_candidates:
            used = np.flatnonzero((r.candidates >= 0).any(0))
            r.candidates = r.candidates[:, : max(1, int(used[-1]) + 1 if len(used) else 1)]
        cand = np.concatenate([r.candidates, r.negatives], axis=1)  # [B, C]
        is_neg = np.zeros(cand.shape, dtype=bool)
        is_neg[:, r.candidates.shape[1] :] = r.negatives >= 0
        rows_of = {"user": r.user_row, "history": r.history, "candidate": cand}
        source = {"hash": lambda f: getattr(hashes, f.entity), "actions": lambda f: log.labels,
                  "surface": lambda f: log.surface}  # fmt: skip
        batch = RecsysBatch(
            **{
                f.name: torch.from_numpy(_gather(source[f.kind](f), rows_of[f.group]))
                for f in BATCH_FIELDS
                if not f.optional  # logs carry no dwell seconds or post timestamps yet
            }
        ).validate(hashes.config)  # checked here, once, not in every forward
        labels = _gather(log.labels, cand)
        labels[is_neg] = 0
        label_mask = np.ones(labels.shape, dtype=bool)
        label_mask[is_neg[..., None] & neg_cols] = False
        cont = _gather(log.continuous, cand)
        cont[is_neg] = 0.0
        rows = np.where(is_neg, -1, cand)
        side = None
        if log.side.any:
            t = torch.from_numpy
            sd = log.side
            side = SideBatch(
                user_feature_rows=t(hashes.user_features[r.user_row]),
                user_numeric=t(sd.user_num[r.user_row]),
                history_signals=t(_gather(sd.signals, r.history)),
                candidate_feature_rows=t(_gather(hashes.post_features, cand)),
                candidate_numeric=t(_gather(sd.post_num, cand)),
            )
        yield LabelledBatch(batch, torch.from_numpy(labels).float(),
                            torch.from_numpy(label_mask), torch.from_numpy(cont), rows,
                            side)  # fmt: skip
