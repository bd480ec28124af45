"""The statistics of local performance: Wilson intervals, the Mann-Whitney AUC with DeLong's interval,
calibration per probability decile, and the operating points of a score. Pure numpy and the standard
library (scipy/statsmodels/sklearn are only the tests' references).

Conventions, the same everywhere: a score at or above a threshold is a positive call (the node's rule,
ihd_node.model), a truth is 1 (present) or 0 (absent), and a rate with no denominator is None, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# AUC and its interval only when each class has at least this many cases: below it DeLong's variance
# estimate is itself too unsteady to mean much.
AUC_MIN_CASES = 10


@dataclass(frozen=True)
class CalibrationBin:
    """One probability decile [low, high) (the last one closed): the scores in it, their mean and the
    observed rate of present reads, with that rate's Wilson interval."""

    low: float
    high: float
    n: int
    mean_predicted: float | None  # None when the bin is empty
    observed_rate: float | None
    observed_ci: tuple[float, float] | None = None
    n_present: int = 0


@dataclass(frozen=True)
class OperatingPoint:
    """What one threshold would have given on the local reads (score >= threshold: positive)."""

    threshold: float
    sensitivity: float | None
    specificity: float | None
    tp: int
    fp: int
    tn: int
    fn: int
    current: bool = False  # the threshold the node's analyses used

    @property
    def ppv(self) -> float | None:
        return ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float | None:
        return ratio(self.tn, self.tn + self.fn)


def ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion successes/n; None when n == 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return None
    z = _z(confidence)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the edges, not 1e-17 off
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _arrays(scores: Iterable[float], truths: Iterable[int | bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(list(scores), dtype=float)
    t = np.asarray(list(truths), dtype=int)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"scores and truths must be two lists of the same length ({s.shape} vs {t.shape})")
    if t.size and not np.isin(t, (0, 1)).all():
        raise ValueError("truths must be 0 (absent) or 1 (present)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite numbers")
    return s, t


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=float)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def auc_with_interval(scores: Iterable[float], truths: Iterable[int | bool], confidence: float = 0.95,
                      min_cases: int = AUC_MIN_CASES) -> tuple[float, float, float] | None:
    """(AUC, low, high): the Mann-Whitney AUC (a tie counts 1/2) with DeLong's (1988) variance and a normal
    interval clipped to [0, 1]. None when either class has fewer than `min_cases` cases.

    DeLong's variance is 0 when the classes are perfectly separated: the interval is then the point."""
    s, t = _arrays(scores, truths)
    pos, neg = s[t == 1], s[t == 0]
    m, n = len(pos), len(neg)
    if m < max(1, min_cases) or n < max(1, min_cases):
        return None
    r_all = _midranks(np.concatenate([pos, neg]))
    r_pos, r_neg = _midranks(pos), _midranks(neg)
    auc = (r_all[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    # Structural components: V10 per positive, V01 per negative.
    v10 = (r_all[:m] - r_pos) / n
    v01 = 1.0 - (r_all[m:] - r_neg) / m
    var = (np.var(v10, ddof=1) if m > 1 else 0.0) / m + (np.var(v01, ddof=1) if n > 1 else 0.0) / n
    half = _z(confidence) * math.sqrt(max(var, 0.0))
    return float(auc), float(max(0.0, auc - half)), float(min(1.0, auc + half))


def calibration_deciles(scores: Iterable[float], truths: Iterable[int | bool],
                        confidence: float = 0.95) -> list[CalibrationBin]:
    """Ten bins of the probability scale, [0, 0.1) ... [0.9, 1.0], every one listed (empty ones with n 0)."""
    s, t = _arrays(scores, truths)
    index = np.clip(np.floor(s * 10.0).astype(int), 0, 9)
    bins = []
    for k in range(10):
        inside = index == k
        n = int(inside.sum())
        present = int(t[inside].sum())
        bins.append(CalibrationBin(
            low=k / 10.0, high=(k + 1) / 10.0, n=n,
            mean_predicted=float(s[inside].mean()) if n else None,
            observed_rate=ratio(present, n),
            observed_ci=wilson_interval(present, n, confidence),
            n_present=present,
        ))
    return bins


def confusion(scores: Sequence[float] | np.ndarray, truths: Sequence[int] | np.ndarray,
              threshold: float) -> tuple[int, int, int, int]:
    """(tp, fp, tn, fn) with score >= threshold called positive."""
    s, t = _arrays(scores, truths)
    called = s >= threshold
    tp = int((called & (t == 1)).sum())
    fp = int((called & (t == 0)).sum())
    return tp, fp, int((t == 0).sum()) - fp, int((t == 1).sum()) - tp


def operating_points(scores: Iterable[float], truths: Iterable[int | bool],
                     thresholds: Iterable[float] | None = None, current: float | None = None,
                     called_anyway: Iterable[bool] | None = None) -> list[OperatingPoint]:
    """Sensitivity and specificity at each threshold, lowest threshold first.

    Default thresholds: every distinct score (the points of the ROC curve, as sklearn's roc_curve with
    drop_intermediate=False gives them, less its "nothing positive" point at +inf); `current`, when given,
    is added and marked. `called_anyway` marks cases called positive whatever this threshold (the node calls
    `any` present whenever a subtype is, ihd_node.values.prediction.positive_mask)."""
    s, t = _arrays(scores, truths)
    forced = np.zeros(len(s), dtype=bool) if called_anyway is None else np.asarray(list(called_anyway), dtype=bool)
    if forced.shape != s.shape:
        raise ValueError("called_anyway must have one entry per score")
    chosen = set(np.unique(s).tolist()) if thresholds is None else {float(x) for x in thresholds}
    if current is not None:
        chosen.add(float(current))
    n_pos, n_neg = int((t == 1).sum()), int((t == 0).sum())
    free = ~forced
    ordered = np.sort(s[free])  # only these depend on the threshold
    ordered_pos = np.sort(s[free & (t == 1)])
    forced_all, forced_pos = int(forced.sum()), int((forced & (t == 1)).sum())
    points = []
    for thr in sorted(chosen):
        tp = forced_pos + len(ordered_pos) - int(np.searchsorted(ordered_pos, thr, side="left"))
        called = forced_all + len(ordered) - int(np.searchsorted(ordered, thr, side="left"))
        fp = called - tp
        points.append(OperatingPoint(
            threshold=float(thr), sensitivity=ratio(tp, n_pos), specificity=ratio(n_neg - fp, n_neg),
            tp=tp, fp=fp, tn=n_neg - fp, fn=n_pos - tp,
            current=current is not None and float(thr) == float(current),
        ))
    return points


def grid_thresholds(step: float = 0.01) -> list[float]:
    """0, step, ..., 1 (rounded, so 0.29 is 0.29): the table's grid when distinct scores are too many."""
    n = round(1.0 / step)
    return [round(k * step, 6) for k in range(n + 1)]
