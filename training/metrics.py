"""The paper's evaluation: weighted multi-label log loss plus per-class accuracy, ROC AUC, sensitivity and
specificity, at slice level and at scan level (scan label and probability = max over its slices).

numpy + scikit-learn only, so evaluation can run without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from ihd_node.classes import CLASSES

# RSNA 2019 weights: `any` counts twice, each subtype once; the loss is divided by their sum (7).
CLASS_WEIGHTS: tuple[float, ...] = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)
# Probabilities are clipped to [EPS, 1 - EPS] before the log, as the Kaggle scorer does (sklearn's log_loss
# used 1e-15; we use 1e-7, which float32 can represent around 1 - EPS). One certain wrong answer then costs
# -log(1e-7) = 16.1 instead of infinity.
EPS = 1e-7


def _as_2d(y: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(y, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(CLASSES):
        raise ValueError(f"{name} must have shape (n, {len(CLASSES)}), got {arr.shape}")
    return arr


def weighted_log_loss(y_true: np.ndarray, y_prob: np.ndarray, weights: Sequence[float] = CLASS_WEIGHTS,
                      eps: float = EPS) -> float:
    """Mean over samples of sum_c w_c * BCE_c / sum_c w_c (the RSNA 2019 challenge metric)."""
    t = _as_2d(y_true, "y_true")
    p = np.clip(_as_2d(y_prob, "y_prob"), eps, 1.0 - eps)
    if t.shape != p.shape:
        raise ValueError(f"labels {t.shape} and probabilities {p.shape} differ in shape")
    if len(t) == 0:
        return float("nan")
    w = np.asarray(weights, dtype=np.float64)
    bce = -(t * np.log(p) + (1.0 - t) * np.log(1.0 - p))
    return float((bce * w).sum(axis=1).mean() / w.sum())


def binary_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, ROC AUC, sensitivity and specificity of one class; NaN where undefined (no positives...)."""
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(y_prob, dtype=np.float64)
    pred = p >= threshold
    tp = int(np.sum(pred & t))
    tn = int(np.sum(~pred & ~t))
    fp = int(np.sum(pred & ~t))
    fn = int(np.sum(~pred & t))
    n_pos, n_neg = tp + fn, tn + fp
    both = n_pos > 0 and n_neg > 0
    return {
        "accuracy": (tp + tn) / len(t) if len(t) else math.nan,
        "auc": float(roc_auc_score(t, p)) if both else math.nan,
        "sensitivity": tp / n_pos if n_pos else math.nan,
        "specificity": tn / n_neg if n_neg else math.nan,
        "threshold": float(threshold),
        "positives": n_pos,
        "negatives": n_neg,
    }


def level_metrics(y_true: np.ndarray, y_prob: np.ndarray,
                  thresholds: Mapping[str, float] | None = None) -> dict[str, object]:
    """Weighted log loss and per-class metrics for one level (rows are slices or scans)."""
    t = _as_2d(y_true, "y_true")
    p = _as_2d(y_prob, "y_prob")
    thr = {c: 0.5 for c in CLASSES} | dict(thresholds or {})
    return {
        "n": int(len(t)),
        "log_loss": weighted_log_loss(t, p),
        "classes": {c: binary_metrics(t[:, k], p[:, k], thr[c]) for k, c in enumerate(CLASSES)},
    }


def scan_level(per_scan_labels: Sequence[np.ndarray],
               per_scan_probs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Scan label and scan probability per class = max over the scan's slices."""
    labels = np.stack([np.asarray(y).max(axis=0) for y in per_scan_labels]).astype(np.float64)
    probs = np.stack([np.asarray(p).max(axis=0) for p in per_scan_probs]).astype(np.float64)
    return labels, probs


def evaluate_scans(per_scan_labels: Sequence[np.ndarray], per_scan_probs: Sequence[np.ndarray],
                   thresholds: Mapping[str, float] | None = None) -> dict[str, dict[str, object]]:
    """Metrics at slice level (all slices pooled) and at scan level."""
    if len(per_scan_labels) != len(per_scan_probs) or not per_scan_labels:
        raise ValueError("need the same, non-zero number of label and probability arrays")
    slice_t = np.concatenate([np.asarray(y) for y in per_scan_labels])
    slice_p = np.concatenate([np.asarray(p) for p in per_scan_probs])
    scan_t, scan_p = scan_level(per_scan_labels, per_scan_probs)
    return {
        "slice": level_metrics(slice_t, slice_p, thresholds),
        "scan": level_metrics(scan_t, scan_p, thresholds),
    }


def choose_thresholds(y_true: np.ndarray, y_prob: np.ndarray, method: str = "youden") -> dict[str, float]:
    """Per-class decision thresholds from a validation set.

    youden: maximise sensitivity + specificity - 1 (balanced, insensitive to prevalence);
    f1: maximise F1 of the positive class. Classes without both labels keep 0.5.
    Ties are broken towards the middle of the widest gap, so a threshold is not glued to one score.
    """
    t = _as_2d(y_true, "y_true").astype(bool)
    p = _as_2d(y_prob, "y_prob")
    out: dict[str, float] = {}
    for k, cls in enumerate(CLASSES):
        out[cls] = _best_threshold(t[:, k], p[:, k], method)
    return out


def _best_threshold(t: np.ndarray, p: np.ndarray, method: str) -> float:
    if t.all() or not t.any():
        return 0.5
    scores = np.unique(p)
    # Candidate cut points halfway between neighbouring distinct scores (plus just below the lowest).
    cuts = np.concatenate([[scores[0] - 1e-6], (scores[:-1] + scores[1:]) / 2.0, [scores[-1] + 1e-6]])
    pred = p[None, :] >= cuts[:, None]
    tp = (pred & t).sum(axis=1)
    fp = (pred & ~t).sum(axis=1)
    fn = t.sum() - tp
    tn = (~t).sum() - fp
    if method == "youden":
        value = tp / (tp + fn) + tn / (tn + fp) - 1.0
    elif method == "f1":
        value = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    else:
        raise ValueError(f"unknown threshold method {method!r}; use youden or f1")
    best = np.flatnonzero(value >= value.max() - 1e-12)
    # Among equally good cuts, take the middle one of the run (a margin on both sides).
    cut = float(cuts[best[len(best) // 2]])
    return float(min(max(cut, 1e-4), 1.0 - 1e-4))


def format_metrics(metrics: Mapping[str, Mapping[str, object]]) -> str:
    """A readable table: one block per level, one row per class."""
    lines: list[str] = []
    for level, m in metrics.items():
        lines.append(f"{level} level (n={m['n']}): weighted log loss {m['log_loss']:.4f}")
        lines.append(f"  {'class':<18}{'AUC':>7}{'acc':>7}{'sens':>7}{'spec':>7}{'thr':>7}{'pos':>6}")
        classes = m["classes"]
        assert isinstance(classes, Mapping)
        for cls, c in classes.items():
            lines.append(f"  {cls:<18}{c['auc']:>7.3f}{c['accuracy']:>7.3f}{c['sensitivity']:>7.3f}"
                         f"{c['specificity']:>7.3f}{c['threshold']:>7.3f}{c['positives']:>6d}")
    return "\n".join(lines)


def jsonable(obj: object) -> object:
    """Metrics with NaN replaced by None, so they survive JSON (checkpoint provenance, model card)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if math.isnan(float(obj)) else round(float(obj), 6)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
