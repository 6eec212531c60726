"""Metrics against hand-computed cases; baselines that never see an evaluation label."""

import json

import numpy as np
import pytest

from hashrec.data import LogSchema, load_log
from hashrec.evaluation.baselines import LogisticBaseline, popularity
from hashrec.evaluation.metrics import auc, calibration, gauc, ndcg_at_k

from conftest import SCHEMA_JSON, write_synthetic_log


def test_auc_hand_computed_and_ties():
    # pairs (pos, neg): (0.35 > 0.1) (0.35 < 0.4) (0.8 > 0.1) (0.8 > 0.4): 3 of 4
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    # a tie between a positive and a negative counts one half: (1 + 0.5) / 2
    assert auc(np.array([0, 0, 1]), np.array([0.2, 0.5, 0.5])) == 0.75
    assert auc(np.array([1, 0]), np.array([0.3, 0.3])) == 0.5  # constant scores: chance
    assert auc(np.array([0, 1]), np.array([0.9, 0.1])) == 0.0  # perfectly wrong
    assert np.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))  # one class: undefined


def test_gauc_weights_users_by_positives_and_skips_single_class_users():
    users = np.array([1, 1, 1, 2, 2, 2, 2, 3, 3])
    labels = np.array([1, 0, 0, 1, 1, 0, 0, 1, 1])  # user 3 has no negative: skipped
    scores = np.array([0.9, 0.1, 0.2, 0.2, 0.8, 0.5, 0.1, 0.3, 0.4])
    # user 1: AUC 1.0 with 1 positive; user 2: pairs (0.2>0.5 no, 0.2>0.1 yes, 0.8 both) = 3/4,
    # 2 positives -> (1 * 1.0 + 2 * 0.75) / 3
    assert gauc(users, labels, scores) == pytest.approx((1.0 + 2 * 0.75) / 3)
    assert np.isnan(gauc(np.array([1, 1]), np.array([0, 0]), np.array([0.1, 0.2])))


def test_ndcg_hand_computed_ties_count_against_the_model():
    req = np.array([0, 0, 0, 1, 1, 2])
    y = np.array([0, 1, 0, 1, 0, 1])
    s = np.array([0.9, 0.5, 0.1, 0.4, 0.4, 0.7])
    # request 0: positive at rank 2 -> 1/log2(3); request 1: tie -> positive placed last
    # -> 1/log2(3); request 2 has one candidate: skipped
    expected = (1 / np.log2(3) + 1 / np.log2(3)) / 2
    assert ndcg_at_k(req, y, s, k=10) == pytest.approx(expected)
    assert ndcg_at_k(req[:3], y[:3], np.array([0.1, 0.9, 0.2]), k=1) == 1.0
    assert ndcg_at_k(req[:3], y[:3], s[:3], k=1) == 0.0  # the positive is not in the top 1


def test_calibration():
    assert calibration(np.array([0, 1, 0, 1]), np.array([0.25, 0.25, 0.25, 0.25])) == 0.5
    assert np.isnan(calibration(np.array([0, 0]), np.array([0.1, 0.1])))


def test_baselines_never_read_evaluation_labels(tmp_path):
    """Flip every label on the evaluation days: the baselines' predictions do not move."""
    path = tmp_path / "log.csv"
    write_synthetic_log(path, days=6)
    log = load_log(str(path), LogSchema.from_dict(json.loads(SCHEMA_JSON)))
    train, ev = log.days(None, 20220428), log.days(20220429, None)
    assert train.any() and ev.any()
    rows = np.flatnonzero(ev)

    def predictions(lg):
        lr = LogisticBaseline().fit(lg, train).predict(lg, train, rows)
        return popularity(lg, train, rows), lr

    before = predictions(log)
    log.labels[ev] = 1 - log.labels[ev]
    after = predictions(log)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    # and the check can fail: flipping a training label does move them
    log.labels[np.flatnonzero(train)[:50]] ^= 1
    assert not np.array_equal(predictions(log)[0], after[0])
