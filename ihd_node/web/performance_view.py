"""What the console's /performance page and the validation report show, built once for both: per class the
figures with their 95 % intervals beside the model card's, the few-reads words, the calibration plot and the
operating-point curves; the drift panels and the positivity per week. Charts are ihd_node.web.svg."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from ihd_node.classes import CLASSES, FINDING_NAMES
from ihd_node.monitoring import ClassPerformance, PerformanceReport
from ihd_node.monitoring.drift import EPSILON, NUMERIC_BINS, DriftReport, FeatureDrift
from ihd_node.web.svg import PALETTE, Line, bar_chart, line_chart

MAX_TABLE_POINTS = 12  # operating points listed in the table (the curve shows all)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def interval(ci: tuple[float, float] | None, *, percent: bool = True) -> str:
    if ci is None:
        return "no interval (no cases)"
    lo, hi = ci
    return f"95 % CI {100 * lo:.1f}–{100 * hi:.1f} %" if percent else f"95 % CI {lo:.3f}–{hi:.3f}"


@dataclass(frozen=True)
class Figure:
    """One row of a class' table: the local figure with its interval and counts, the model card's figure."""

    name: str
    value: str
    interval: str
    counts: str
    card: str


@dataclass(frozen=True)
class ClassView:
    finding: str
    words: str
    perf: ClassPerformance
    figures: list[Figure]
    calibration: Markup
    roc: Markup
    thresholds: Markup
    table: list[dict[str, Any]]  # operating points listed


def _card(card: dict[str, Any] | None, key: str, percent: bool = True) -> str:
    value = None if card is None else card.get(key)
    if value is None:
        return "–"
    return pct(value) if percent else f"{value:.3f}"


def class_view(cp: ClassPerformance) -> ClassView:
    card = cp.card
    figures = [
        Figure("Sensitivity", pct(cp.sensitivity), interval(cp.sensitivity_ci), f"{cp.tp} of {cp.tp + cp.fn}",
               _card(card, "sensitivity")),
        Figure("Specificity", pct(cp.specificity), interval(cp.specificity_ci), f"{cp.tn} of {cp.tn + cp.fp}",
               _card(card, "specificity")),
        Figure("PPV", pct(cp.ppv), interval(cp.ppv_ci), f"{cp.tp} of {cp.tp + cp.fp}", _card(card, "ppv")),
        Figure("NPV", pct(cp.npv), interval(cp.npv_ci), f"{cp.tn} of {cp.tn + cp.fn}", _card(card, "npv")),
        Figure("AUC", "–" if cp.auc is None else f"{cp.auc:.3f}",
               interval(cp.auc_ci, percent=False) if cp.auc is not None else
               "not computed: too few present or absent reads", f"{cp.n_present} present, {cp.n_absent} absent",
               _card(card, "auc", percent=False)),
    ]
    calibration = [b for b in cp.calibration if b.n and b.mean_predicted is not None and b.observed_rate is not None]
    cal = line_chart(
        f"Calibration: {FINDING_NAMES[cp.finding]}",
        [Line("observed rate per decile", [(b.mean_predicted, b.observed_rate) for b in calibration],
              PALETTE[1], bars=[(b.mean_predicted, *b.observed_ci) for b in calibration if b.observed_ci])],
        x_label="mean predicted probability", y_label="observed rate of present reads", diagonal=True,
        empty="no read results yet")
    points = sorted(cp.operating_points, key=lambda p: p.threshold)
    roc_pts = sorted({(1 - p.specificity, p.sensitivity) for p in points
                      if p.sensitivity is not None and p.specificity is not None})
    current = [p for p in points if p.current and p.sensitivity is not None and p.specificity is not None]
    roc = line_chart(
        f"Operating points: {FINDING_NAMES[cp.finding]}",
        [Line("thresholds", [(0.0, 0.0), *roc_pts, (1.0, 1.0)] if roc_pts else [], PALETTE[0], dots=False),
         Line("current threshold", [(1 - p.specificity, p.sensitivity) for p in current], PALETTE[1])],
        x_label="1 − specificity", y_label="sensitivity", diagonal=True, empty="no read results yet")
    thr = line_chart(
        f"Sensitivity and specificity by threshold: {FINDING_NAMES[cp.finding]}",
        [Line("sensitivity", [(p.threshold, p.sensitivity) for p in points], PALETTE[0], step=True, dots=False),
         Line("specificity", [(p.threshold, p.specificity) for p in points], PALETTE[2], step=True, dots=False),
         Line("current threshold", [(cp.threshold, 0.0), (cp.threshold, 1.0)] if cp.threshold is not None else [],
              PALETTE[1], dots=False, dashed=True)],
        x_label="threshold (score ≥ threshold: positive)", y_label="rate", empty="no read results yet")
    return ClassView(cp.finding, FINDING_NAMES[cp.finding], cp, figures, cal, roc, thr, _table(points))


def _table(points: list[Any]) -> list[dict[str, Any]]:
    if len(points) > MAX_TABLE_POINTS:
        step = (len(points) - 1) / (MAX_TABLE_POINTS - 1)
        keep = {round(i * step) for i in range(MAX_TABLE_POINTS)} | {i for i, p in enumerate(points) if p.current}
        points = [p for i, p in enumerate(points) if i in keep]
    return [{"threshold": f"{p.threshold:.3f}", "sensitivity": pct(p.sensitivity), "specificity": pct(p.specificity),
             "counts": f"TP {p.tp} FP {p.fp} TN {p.tn} FN {p.fn}", "current": p.current} for p in points]


@dataclass(frozen=True)
class DriftPanel:
    feature: FeatureDrift
    chart: Markup


def drift_panels(drift: DriftReport) -> list[DriftPanel]:
    panels = []
    for f in drift.features:
        n_r, n_c = max(f.n_reference, 1), max(f.n_current, 1)
        chart = bar_chart(f"{f.title}: PSI {f.psi:.2f}", f.bins,
                          [("reference", [c / n_r for c in f.reference], PALETTE[0]),
                           ("current", [c / n_c for c in f.current], PALETTE[1])],
                          y_label="share of results", y_max=1.0)
        panels.append(DriftPanel(f, chart))
    return panels


def positivity_chart(drift: DriftReport) -> Markup:
    return bar_chart("Positive results per week (any finding)", [w.week for w in drift.weeks],
                     [("positive share", [w.rate for w in drift.weeks], PALETTE[1])], y_label="share positive",
                     y_max=1.0, empty="no results yet")


def performance_context(perf: PerformanceReport, drift: DriftReport | None) -> dict[str, Any]:
    """The template context of templates/performance_body.html."""
    return {"perf": perf, "classes": [class_view(perf.classes[c]) for c in CLASSES if c in perf.classes],
            "drift": drift, "panels": drift_panels(drift) if drift is not None else [],
            "positivity": positivity_chart(drift) if drift is not None else None, "epsilon": EPSILON,
            "numeric_bins": NUMERIC_BINS, "pct": pct, "interval": interval}
