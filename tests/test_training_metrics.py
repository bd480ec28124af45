"""The evaluation metric against a direct computation, thresholds, and scan-grouped splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ihd_node.classes import CLASSES
from training.data import CachedScan, balanced_slice_weights, split_groups
from training.metrics import (
    EPS,
    binary_metrics,
    choose_thresholds,
    evaluate_scans,
    weighted_log_loss,
)


def direct_weighted_log_loss(y: list[list[int]], p: list[list[float]]) -> float:
    """The RSNA 2019 scorer written out: every (slice, class) row weighted 2 for any, 1 otherwise."""
    weights = [2, 1, 1, 1, 1, 1]
    total, weight_sum = 0.0, 0.0
    for labels, probs in zip(y, p, strict=True):
        for k in range(6):
            q = min(max(probs[k], EPS), 1 - EPS)
            loss = -math.log(q) if labels[k] else -math.log(1 - q)
            total += weights[k] * loss
            weight_sum += weights[k]
    return total / weight_sum


def test_weighted_log_loss_matches_direct_computation() -> None:
    y = [[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1]]
    p = [[0.9, 0.1, 0.8, 0.2, 0.05, 0.3], [0.2, 0.01, 0.1, 0.0, 0.3, 0.4], [0.6, 0.7, 0.2, 0.1, 1.0, 0.5]]
    expected = direct_weighted_log_loss(y, p)
    assert weighted_log_loss(np.array(y), np.array(p)) == pytest.approx(expected, rel=1e-12)
    # By hand for one row: only `any` uncertain -> 2 * -log(0.5) / 7.
    one = weighted_log_loss(np.array([[1, 0, 0, 0, 0, 0]]), np.array([[0.5, 0, 0, 0, 0, 0]]))
    assert one == pytest.approx((2 * math.log(2) + 5 * -math.log(1 - EPS)) / 7, rel=1e-9)
    # A certain wrong answer costs -log(EPS), not infinity.
    worst = weighted_log_loss(np.ones((1, 6)), np.zeros((1, 6)))
    assert worst == pytest.approx(-math.log(EPS), rel=1e-6)


def test_binary_metrics_counts() -> None:
    t = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.4, 0.05])
    m = binary_metrics(t, p, threshold=0.5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # AUC by pair counting: positives beat negatives in 13 of 15 pairs.
    pairs = [(a > b) + 0.5 * (a == b) for a in p[t == 1] for b in p[t == 0]]
    assert m["auc"] == pytest.approx(sum(pairs) / len(pairs))
    assert math.isnan(binary_metrics(np.zeros(3), np.array([0.1, 0.2, 0.3]), 0.5)["auc"])


def test_scan_level_is_max_over_slices() -> None:
    labels = [np.array([[0] * 6, [1, 0, 0, 0, 1, 0]]), np.zeros((3, 6))]
    probs = [np.array([[0.2] * 6, [0.9, 0.1, 0.1, 0.1, 0.8, 0.1]]), np.full((3, 6), 0.3)]
    m = evaluate_scans(labels, probs)
    assert m["slice"]["n"] == 5 and m["scan"]["n"] == 2
    scan_y = np.array([[1, 0, 0, 0, 1, 0], [0] * 6])
    scan_p = np.array([[0.9, 0.2, 0.2, 0.2, 0.8, 0.2], [0.3] * 6])
    assert m["scan"]["log_loss"] == pytest.approx(direct_weighted_log_loss(scan_y.tolist(), scan_p.tolist()))
    assert m["scan"]["classes"]["any"]["auc"] == 1.0


def test_thresholds_separate_when_possible() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(40, 6))
    p = np.where(y == 1, 0.6 + 0.3 * rng.random((40, 6)), 0.4 * rng.random((40, 6)))
    thr = choose_thresholds(y, p, "youden")
    for k, c in enumerate(CLASSES):
        assert binary_metrics(y[:, k], p[:, k], thr[c])["accuracy"] == 1.0
    assert choose_thresholds(y, p, "f1").keys() == thr.keys()


def _scans(n: int, groups: int | None = None) -> list[CachedScan]:
    out = []
    for i in range(n):
        lab = [[1, 0, 1, 0, 0, 0]] if i % 3 == 0 else [[0] * 6]
        out.append(CachedScan(scan_id=f"s{i}", group=f"g{i % groups}" if groups else f"s{i}", path="x.npy",
                              keys=[f"k{i}"], labels=lab))
    return out


def test_splits_grouped_deterministic_and_disjoint() -> None:
    scans = _scans(60)
    a = split_groups(scans, 0.2, 0.1, seed=3)
    assert a == split_groups(scans, 0.2, 0.1, seed=3)
    assert a != split_groups(scans, 0.2, 0.1, seed=4)
    ids = [set(a[k]) for k in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == 60
    # Positive scans are spread over the splits, not all on one side.
    assert all(any(int(s[1:]) % 3 == 0 for s in part) for part in ids)
    # Grouping by patient keeps every group on one side.
    grouped = _scans(60, groups=7)
    b = split_groups(grouped, 0.3, 0.0, seed=1)
    side = {s: k for k, v in b.items() for s in v}
    for g in range(7):
        assert len({side[s.scan_id] for s in grouped if s.group == f"g{g}"}) == 1


def test_balanced_weights_even_over_subtypes() -> None:
    labels = np.zeros((100, 6), np.float32)
    labels[:2, [0, 1]] = 1  # 2 epidural slices
    labels[2:30, [0, 5]] = 1  # 28 subdural slices
    w = balanced_slice_weights(labels, positive_share=0.5)
    w = w / w.sum()
    assert w[:2].sum() == pytest.approx(0.25)
    assert w[2:30].sum() == pytest.approx(0.25)
    assert w[30:].sum() == pytest.approx(0.5)
