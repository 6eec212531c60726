"""Ranking metrics: AUC, per-user AUC (GAUC), per-request NDCG@k, calibration."""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["auc", "calibration", "gauc", "ndcg_at_k"]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(xs)] - 1
    avg = (first + last) / 2.0 + 1.0
    ranks = np.empty(len(x))
    ranks[order] = avg[group]
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); nan without both classes.

    >>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    y = np.asarray(labels).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    r = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((r[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def gauc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-group AUC averaged with weights = positives, over groups with both labels."""
    order = np.argsort(groups, kind="mergesort")
    g, y, s = groups[order], labels[order], scores[order]
    bounds = np.flatnonzero(np.r_[True, g[1:] != g[:-1], True])
    total, weight = 0.0, 0.0
    for a, b in itertools.pairwise(bounds):
        pos = float(y[a:b].sum())
        if 0 < pos < b - a:
            total += pos * auc(y[a:b], s[a:b])
            weight += pos
    return total / weight if weight else float("nan")


def ndcg_at_k(requests: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over requests with >= 2 candidates and >= 1 positive (gain = label).

    Ties in score are broken against the model (positives last), so a constant scorer gets no
    credit from the input order.
    """
    order = np.lexsort((labels, -scores, requests))
    r, y = requests[order], labels[order].astype(np.float64)
    bounds = np.flatnonzero(np.r_[True, r[1:] != r[:-1], True])
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    vals = []
    for a, b in itertools.pairwise(bounds):
        ys = y[a:b]
        if b - a < 2 or ys.sum() == 0:
            continue
        dcg = (ys[:k] * disc[: min(k, b - a)]).sum()
        ideal = np.sort(ys)[::-1][:k]
        vals.append(dcg / (ideal * disc[: len(ideal)]).sum())
    return float(np.mean(vals)) if vals else float("nan")


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean predicted probability / observed positive rate (1.0 = calibrated)."""
    rate = float(np.mean(labels))
    return float(np.mean(probs)) / rate if rate > 0 else float("nan")
