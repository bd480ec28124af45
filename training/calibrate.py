"""Calibration and thresholds from validation scans, and the figures that judge them.

- fit_platt: per-class Platt scaling of the scan-level logit (with Platt's smoothed targets, so a
  validation set the model separates perfectly does not drive the scale to infinity);
- thresholds_by_policy: "sensitivity" (default): per class, the highest threshold that keeps the
  validation sensitivity at or above the target (0.95); "youden" / "f1" as before;
- class_figures: AUC, sensitivity and specificity at the thresholds with Wilson 95 % intervals, the share
  of series called positive although the class is absent, and the expected calibration error (ECE,
  10 equal-width bins) with the reliability bins behind it.

numpy + scikit-learn only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from ihd_node.classes import CLASSES
from ihd_node.model.calibration import Calibration
from training.metrics import choose_thresholds

THRESHOLD_METHODS = ("sensitivity", "youden", "f1")


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1.0 - 1e-7)
    return np.log(q) - np.log1p(-q)


def _platt_one(t: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    """(scale, bias) minimising the cross-entropy against Platt's targets, by Newton steps."""
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return 1.0, 0.0
    target = np.where(t, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    def loss(a: float, b: float) -> float:
        u = a * z + b  # cross-entropy in a stable form: log(1 + e^u) - target * u, plus a weak prior
        return float(np.sum(np.logaddexp(0.0, u) - target * u)) + 5e-4 * ((a - 1.0) ** 2 + b * b)

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(100):  # Newton steps, halved until the loss goes down (saturated starts overshoot)
        p = 0.5 * (1.0 + np.tanh(0.5 * (a * z + b)))
        r = p - target
        w = np.maximum(p * (1.0 - p), 1e-9)
        g = np.array([np.sum(r * z), np.sum(r)]) + 1e-3 * np.array([a - 1.0, b])
        h = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]]) + 1e-3 * np.eye(2)
        step = np.linalg.solve(h, g)
        scale = 1.0
        while scale > 1e-6 and loss(a - scale * step[0], b - scale * step[1]) > current:
            scale /= 2.0
        if scale <= 1e-6:
            break
        a, b = a - scale * step[0], b - scale * step[1]
        new = loss(a, b)
        if current - new < 1e-10:
            break
        current = new
    return float(max(a, 0.05)), float(b)  # scale > 0: calibration never reverses the ranking


def fit_platt(labels: np.ndarray, probs: np.ndarray, fitted_on: str) -> Calibration:
    t = np.asarray(labels).astype(bool)
    z = _logit(probs)
    params = [_platt_one(t[:, k], z[:, k]) for k in range(len(CLASSES))]
    return Calibration("platt", tuple(p[0] for p in params), tuple(p[1] for p in params), fitted_on)


def _sensitivity_threshold(t: np.ndarray, p: np.ndarray, target: float) -> float:
    """The highest threshold at which at least `target` of the positives score at or above it, placed
    halfway to the next lower score (a margin, not glued to one series)."""
    if not t.any() or t.all():
        return 0.5
    pos = np.sort(p[t])
    misses = int(math.floor((1.0 - target) * len(pos) + 1e-9))  # positives allowed below the threshold
    cut = float(pos[misses])
    below = p[p < cut]
    thr = (cut + float(below.max())) / 2.0 if below.size else cut - 1e-6
    return float(min(max(thr, 1e-4), 1.0 - 1e-4))


def _specificity_threshold(t: np.ndarray, p: np.ndarray, floor: float) -> float:
    """The lowest threshold at which at least `floor` of the negatives score below it (halfway to the
    next higher score)."""
    if not t.any() or t.all():
        return 0.5
    neg = np.sort(p[~t])
    allowed = int(math.floor((1.0 - floor) * len(neg) + 1e-9))  # negatives allowed at or above it
    top = float(neg[len(neg) - 1 - allowed])  # the highest negative score that must stay below
    above = p[p > top]
    thr = (top + float(above.min())) / 2.0 if above.size else top + 1e-6
    return float(min(max(thr, 1e-4), 1.0 - 1e-4))


def thresholds_by_policy(labels: np.ndarray, probs: np.ndarray, method: str = "sensitivity",
                         target: float = 0.95, min_specificity: float = 0.0) -> dict[str, float]:
    """Per-class thresholds. "sensitivity": the highest threshold keeping sensitivity >= target, raised
    where needed so that specificity >= min_specificity (the floor wins when both cannot hold)."""
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {method!r}; use one of {', '.join(THRESHOLD_METHODS)}")
    if method != "sensitivity":
        return choose_thresholds(labels, probs, method)
    t = np.asarray(labels).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    out = {}
    for k, c in enumerate(CLASSES):
        thr = _sensitivity_threshold(t[:, k], p[:, k], target)
        if min_specificity > 0 and t[:, k].any() and not t[:, k].all():
            thr = max(thr, _specificity_threshold(t[:, k], p[:, k], min_specificity))
        out[c] = thr
    return out


def policy_text(method: str, target: float, min_specificity: float = 0.0) -> str:
    if method == "sensitivity":
        floor = (f", raised where needed to keep specificity >= {min_specificity:g} (the specificity floor wins "
                 "where both cannot hold)") if min_specificity > 0 else ""
        return (f"per class, the highest threshold that keeps the scan-level sensitivity >= {target:g} on the "
                f"validation series (calibrated probabilities){floor}")
    return {"youden": "Youden's J (sensitivity + specificity - 1) maximised", "f1": "F1 maximised"}[method] \
        + " on the validation series, scan level"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k/n (None when n is 0)."""
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def reliability(t: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[float, list[dict[str, float]]]:
    """ECE (weighted mean |observed - predicted| over equal-width bins) and the non-empty bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        if not m.any():
            continue
        mean_p, frac = float(p[m].mean()), float(t[m].mean())
        ece += m.sum() / len(p) * abs(frac - mean_p)
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()),
                     "mean_probability": round(mean_p, 4), "observed": round(frac, 4)})
    return float(ece), rows


def class_figures(labels: np.ndarray, probs: np.ndarray, thresholds: Mapping[str, float]) -> dict[str, Any]:
    """Per-class scan-level figures at the thresholds (the keys the model card and `performance` read)."""
    t_all = np.asarray(labels).astype(bool)
    p_all = np.asarray(probs, dtype=np.float64)
    out: dict[str, Any] = {}
    for k, c in enumerate(CLASSES):
        t, p = t_all[:, k], p_all[:, k]
        pred = p >= thresholds[c]
        tp, fn = int((pred & t).sum()), int((~pred & t).sum())
        tn, fp = int((~pred & ~t).sum()), int((pred & ~t).sum())
        ece, bins = reliability(t.astype(float), p)
        out[c] = {
            "auc": float(roc_auc_score(t, p)) if t.any() and not t.all() else None,
            "sensitivity": tp / (tp + fn) if tp + fn else None, "sensitivity_ci": wilson(tp, tp + fn),
            "specificity": tn / (tn + fp) if tn + fp else None, "specificity_ci": wilson(tn, tn + fp),
            "called_when_absent": fp / (tn + fp) if tn + fp else None,
            "threshold": float(thresholds[c]), "ece": ece, "positives": tp + fn, "negatives": tn + fp,
            "reliability": bins,
        }
    return out


def format_figures(figures: Mapping[str, Mapping[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "  n/a" if v is None else f"{v:5.3f}"

    lines = [f"  {'class':<18}{'AUC':>7}{'sens':>7}{'spec':>7}{'absent+':>8}{'ECE':>7}{'thr':>7}{'pos':>5}{'neg':>5}"]
    for c, m in figures.items():
        lines.append(f"  {c:<18}{f(m['auc']):>7}{f(m['sensitivity']):>7}{f(m['specificity']):>7}"
                     f"{f(m['called_when_absent']):>8}{f(m['ece']):>7}{m['threshold']:>7.3f}"
                     f"{m['positives']:>5d}{m['negatives']:>5d}")
    return "\n".join(lines)
