"""Local performance (issue 19): the node's results against the radiologist's current reads, per class.

A result is a study: its latest analysis (ihd_node.store.ResultRow). Per class, a study counts when its
current read for that class is present or absent; "not assessed" reads are left out of every figure and
counted in n_not_assessed; a result without a read of the class is counted in n_unread. "any" is judged
against the reads of "any" only (never derived from the subtypes' reads).

The call is the node's own: positive when the analysis called the class (analyses.positive_classes, made at
the thresholds that analysis used); scores are the analysis' probabilities. The node calls `any` present
whenever it calls a subtype present (ihd_node.values.prediction.positive_mask), whatever p_any: the
operating points of `any` keep those calls (what changing the `any` threshold alone would give); its AUC and
calibration are those of p_any itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from ihd_node.classes import CLASSES
from ihd_node.monitoring.card import card_figures
from ihd_node.monitoring.stats import (
    AUC_MIN_CASES,
    CalibrationBin,
    OperatingPoint,
    auc_with_interval,
    calibration_deciles,
    grid_thresholds,
    operating_points,
    ratio,
    wilson_interval,
)
from ihd_node.store import Database, ResultRow, utcnow

# Below this many present (or absent) reads in a class, or with a sensitivity/specificity interval wider than
# MAX_INTERVAL_WIDTH, the class is flagged few_reads: the figure is shown, with its interval, and the words.
MIN_READS = 20
MAX_INTERVAL_WIDTH = 0.3
# Operating points at every distinct score up to this many; beyond it a 0.01 grid (plus the current threshold).
MAX_DISTINCT_POINTS = 200

Interval = tuple[float, float] | None


@dataclass(frozen=True)
class ClassPerformance:
    finding: str
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float | None
    sensitivity_ci: Interval
    specificity: float | None
    specificity_ci: Interval
    ppv: float | None
    ppv_ci: Interval
    npv: float | None
    npv_ci: Interval
    auc: float | None  # None below AUC_MIN_CASES present or absent reads
    auc_ci: Interval  # DeLong
    n_read: int  # results with a present or absent read of this class
    n_unread: int  # results without any current read of this class
    few_reads: bool
    few_reads_reason: str  # "" when not few_reads
    calibration: list[CalibrationBin]
    operating_points: list[OperatingPoint]
    threshold: float | None  # the one the latest result used (analyses.thresholds)
    card: dict[str, Any] | None  # the model card's own validation figures for this class
    n_present: int = 0
    n_absent: int = 0
    n_not_assessed: int = 0
    thresholds_used: list[float] = field(default_factory=list)  # distinct thresholds of the counted results
    accuracy: float | None = None
    accuracy_ci: Interval = None


@dataclass(frozen=True)
class PerformanceReport:
    since: datetime | None
    until: datetime | None
    generated_at: datetime
    model_name: str | None  # of the latest result
    model_version: str | None
    n_results: int  # studies with a result in the period
    n_read_studies: int  # of those, studies with at least one current read (any class, any value)
    time_to_result: dict[str, float | int | None]  # p50_seconds, p90_seconds, n
    classes: dict[str, ClassPerformance]
    models: list[str] = field(default_factory=list)  # "name version" of every model among the results
    card_source: str | None = None  # where the model card's figures came from
    confidence: float = 0.95

    def to_json(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, float):
        return None if not np.isfinite(value) else value
    return value


def _width(ci: Interval) -> float | None:
    return None if ci is None else ci[1] - ci[0]


def few_reads_reason(n_present: int, n_absent: int, sensitivity_ci: Interval, specificity_ci: Interval) -> str:
    """Plain words on why the figures of a class are not yet reliable; "" when they are."""
    parts = []
    for n, what, used in ((n_present, "present", "sensitivity"), (n_absent, "absent", "specificity")):
        if n < MIN_READS:
            parts.append(f"only {n} {what} read{'s' if n != 1 else ''} (fewer than {MIN_READS}), "
                         f"so the {used} is uncertain")
    for name, ci in (("sensitivity", sensitivity_ci), ("specificity", specificity_ci)):
        w = _width(ci)
        if w is not None and w > MAX_INTERVAL_WIDTH and not any(name in p for p in parts):
            parts.append(f"the {name} interval is {w:.2f} wide (more than {MAX_INTERVAL_WIDTH})")
    return "; ".join(parts)


def _time_to_result(results: list[ResultRow]) -> dict[str, float | int | None]:
    seconds = [(r.delivered - r.first_received).total_seconds() for r in results if r.delivered is not None]
    if not seconds:
        return {"p50_seconds": None, "p90_seconds": None, "n": 0}
    return {"p50_seconds": float(np.percentile(seconds, 50)), "p90_seconds": float(np.percentile(seconds, 90)),
            "n": len(seconds)}


def class_performance(finding: str, results: list[ResultRow], reads: dict[str, dict[str, Any]],
                      card: dict[str, Any] | None = None, confidence: float = 0.95) -> ClassPerformance:
    """One class' figures. `reads`: study UID -> finding -> an object with .value (Database.current_reads)."""
    scores: list[float] = []
    truths: list[int] = []
    called: list[bool] = []
    by_subtype: list[bool] = []  # "any" called because a subtype was (positive_mask's rule)
    used: set[float] = set()
    n_unread = n_not_assessed = 0
    for r in results:
        read = reads.get(r.study_instance_uid, {}).get(finding)
        if read is None:
            n_unread += 1
            continue
        if read.value == "not_assessed":
            n_not_assessed += 1
            continue
        scores.append(r.probabilities[finding])
        truths.append(1 if read.value == "present" else 0)
        called.append(finding in r.positives)
        by_subtype.append(finding == CLASSES[0] and any(c in r.positives for c in CLASSES[1:]))
        if finding in r.thresholds:
            used.add(r.thresholds[finding])
    t = np.asarray(truths, dtype=int)
    c = np.asarray(called, dtype=bool)
    tp = int((c & (t == 1)).sum())
    fp = int((c & (t == 0)).sum())
    n_present, n_absent = int((t == 1).sum()), int((t == 0).sum())
    tn, fn = n_absent - fp, n_present - tp
    sens_ci = wilson_interval(tp, n_present, confidence)
    spec_ci = wilson_interval(tn, n_absent, confidence)
    auc = auc_with_interval(scores, truths, confidence, AUC_MIN_CASES)
    latest = next((r.thresholds[finding] for r in reversed(results) if finding in r.thresholds), None)
    grid = None if len(set(scores)) <= MAX_DISTINCT_POINTS else grid_thresholds(0.01)
    points = operating_points(scores, truths, grid, current=latest, called_anyway=by_subtype)
    reason = few_reads_reason(n_present, n_absent, sens_ci, spec_ci)
    return ClassPerformance(
        finding=finding, tp=tp, fp=fp, tn=tn, fn=fn,
        sensitivity=ratio(tp, n_present), sensitivity_ci=sens_ci,
        specificity=ratio(tn, n_absent), specificity_ci=spec_ci,
        ppv=ratio(tp, tp + fp), ppv_ci=wilson_interval(tp, tp + fp, confidence),
        npv=ratio(tn, tn + fn), npv_ci=wilson_interval(tn, tn + fn, confidence),
        auc=None if auc is None else auc[0], auc_ci=None if auc is None else (auc[1], auc[2]),
        n_read=len(truths), n_unread=n_unread, few_reads=bool(reason), few_reads_reason=reason,
        calibration=calibration_deciles(scores, truths, confidence), operating_points=points, threshold=latest,
        card=card, n_present=n_present, n_absent=n_absent, n_not_assessed=n_not_assessed,
        thresholds_used=sorted(used), accuracy=ratio(tp + tn, len(truths)),
        accuracy_ci=wilson_interval(tp + tn, len(truths), confidence),
    )


def local_performance(db: Database, *, since: datetime | None = None, until: datetime | None = None,
                      model_card: dict[str, Any] | None = None, confidence: float = 0.95) -> PerformanceReport:
    """Every class' local performance over the results made in [since, until). `model_card`: the checkpoint's
    metadata (ihd_node.model.checkpoint.read_checkpoint's dict) or card_figures' per-class dict."""
    results = db.performance_results(since, until)
    reads = db.current_reads({r.study_instance_uid for r in results}) if results else {}
    figures = card_figures(model_card)
    classes = {c: class_performance(c, results, reads, figures.get(c), confidence) for c in CLASSES}
    latest = results[-1] if results else None
    models = sorted({f"{r.model_name} {r.model_version}" for r in results})
    return PerformanceReport(
        since=since, until=until, generated_at=utcnow(),
        model_name=latest.model_name if latest else None, model_version=latest.model_version if latest else None,
        n_results=len(results), n_read_studies=sum(1 for r in results if reads.get(r.study_instance_uid)),
        time_to_result=_time_to_result(results), classes=classes, models=models,
        card_source=next((f["source"] for f in figures.values() if f.get("source")), None), confidence=confidence,
    )
