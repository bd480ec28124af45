"""Drift: the input mix and the score distribution of each class, now against the reference window.

What is compared (one "feature" each), every analysed series counted once (its latest analysis):
- categorical: manufacturer, scanner model, reconstruction kernel, Enhanced vs classic CT; a value not in
  the reference is a bin of its own, missing values are "(not given)";
- binned numbers, fixed edges so that every site reads the same bins: slice thickness (mm), kVp, pixel
  spacing (mm), see NUMERIC_BINS;
- the score (probability) of each class, in the reference window's deciles (edges = its 10 %..90 %
  quantiles, repeated edges merged), with a two-sample Kolmogorov-Smirnov p-value as a second opinion.

Population stability index per feature: PSI = sum over bins (a - e) * ln(a / e), with e the reference and
a the current proportion of a bin, each floored at EPSILON so an empty bin on one side gives a large but
finite value. Rules of thumb: under 0.1 stable, 0.1-0.25 a shift worth a look, 0.25 and over a change.
Positivity rate (any finding positive) is counted per ISO week, shown, not alerted on.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from ihd_node.classes import CLASSES
from ihd_node.config import MonitoringConfig
from ihd_node.store import AnalysedResult, Database, utcnow

EPSILON = 1e-4  # proportion floor of a bin in the PSI
NOT_GIVEN = "(not given)"
CATEGORICAL = {"manufacturer": "Manufacturer", "model_name": "Scanner model", "kernel": "Reconstruction kernel",
               "enhanced": "Enhanced vs classic CT"}
# Upper edges of the bins (the last bin is open); chosen around common head-CT protocols.
NUMERIC_BINS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "slice_thickness": ("Slice thickness", "mm", (1.5, 2.5, 3.5, 4.5, 5.5)),
    "kvp": ("Tube voltage", "kV", (90.0, 110.0, 130.0)),
    "pixel_spacing": ("Pixel spacing", "mm", (0.4, 0.5, 0.6, 0.8, 1.0)),
}


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's two distributions, its PSI and how the limits judge it."""

    name: str  # input_kernel, score_any, ...
    title: str
    kind: str  # "input" or "score"
    bins: list[str]
    reference: list[int]
    current: list[int]
    psi: float
    level: str  # ok / warning / alert / too_few
    ks_p: float | None = None  # scores only

    @property
    def n_reference(self) -> int:
        return sum(self.reference)

    @property
    def n_current(self) -> int:
        return sum(self.current)


@dataclass(frozen=True)
class WeekRate:
    week: str  # ISO week, e.g. 2026-W49
    n: int
    positives: int

    @property
    def rate(self) -> float:
        return self.positives / self.n if self.n else 0.0


@dataclass
class DriftReport:
    generated_at: datetime
    reference: tuple[datetime | None, datetime | None]  # [since, until)
    current: tuple[datetime | None, datetime | None]
    n_reference: int
    n_current: int
    min_results: int
    features: list[FeatureDrift] = field(default_factory=list)
    weeks: list[WeekRate] = field(default_factory=list)
    reference_positivity: float | None = None  # share of results positive for any finding
    current_positivity: float | None = None

    @property
    def enough(self) -> bool:
        return self.n_reference >= self.min_results and self.n_current >= self.min_results

    @property
    def status(self) -> str:
        """too_few (not judged), ok, warning (a PSI at or over warning_psi) or alert (over alert_psi)."""
        if not self.enough:
            return "too_few"
        levels = {f.level for f in self.features}
        return "alert" if "alert" in levels else "warning" if "warning" in levels else "ok"

    def over(self, level: str) -> list[FeatureDrift]:
        order = {"ok": 0, "too_few": 0, "warning": 1, "alert": 2}
        return sorted((f for f in self.features if order[f.level] >= order[level]), key=lambda f: -f.psi)

    def reason(self) -> str:
        """The features at alert level in words, worst first."""
        return "; ".join(f"{f.title} PSI {f.psi:.2f}" for f in self.over("alert"))

    def to_json(self) -> dict[str, object]:
        def iso(t: datetime | None) -> str | None:
            return t.isoformat(timespec="seconds") if t else None
        return {"generated_at": iso(self.generated_at), "status": self.status, "epsilon": EPSILON,
                "reference": {"since": iso(self.reference[0]), "until": iso(self.reference[1]), "n": self.n_reference},
                "current": {"since": iso(self.current[0]), "until": iso(self.current[1]), "n": self.n_current},
                "min_results": self.min_results, "reference_positivity": self.reference_positivity,
                "current_positivity": self.current_positivity,
                "features": [{"name": f.name, "title": f.title, "kind": f.kind, "bins": f.bins,
                              "reference": f.reference, "current": f.current, "psi": round(f.psi, 4),
                              "level": f.level, "ks_p": f.ks_p} for f in self.features],
                "positivity_per_week": [{"week": w.week, "n": w.n, "positives": w.positives,
                                         "rate": round(w.rate, 4)} for w in self.weeks]}


def psi(reference: Sequence[int], current: Sequence[int], epsilon: float = EPSILON) -> float:
    """Population stability index of two histograms over the same bins (counts)."""
    n_ref, n_cur = sum(reference), sum(current)
    if n_ref == 0 or n_cur == 0:
        return 0.0
    total = 0.0
    for e_count, a_count in zip(reference, current, strict=True):
        e = max(e_count / n_ref, epsilon)
        a = max(a_count / n_cur, epsilon)
        total += (a - e) * math.log(a / e)
    return total


def numeric_bin_labels(unit: str, edges: Sequence[float]) -> list[str]:
    labels = [f"< {edges[0]:g} {unit}"]
    labels += [f"{lo:g}-{hi:g} {unit}" for lo, hi in zip(edges, edges[1:], strict=False)]
    return [*labels, f">= {edges[-1]:g} {unit}", NOT_GIVEN]


def numeric_bin(value: object, edges: Sequence[float]) -> int:
    if value is None:
        return len(edges) + 1
    return int(np.searchsorted(np.asarray(edges), float(value), side="right"))  # type: ignore[arg-type]


def categorical_value(value: object) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return NOT_GIVEN
    if isinstance(value, bool):
        return "Enhanced CT" if value else "CT (classic)"
    return str(value).strip()


def _level(value: float, settings: MonitoringConfig, enough: bool) -> str:
    if not enough:
        return "too_few"
    return "alert" if value >= settings.alert_psi else "warning" if value >= settings.warning_psi else "ok"


def compare(reference: list[AnalysedResult], current: list[AnalysedResult], settings: MonitoringConfig
            ) -> list[FeatureDrift]:
    """Every feature's PSI between the two windows."""
    enough = len(reference) >= settings.min_results and len(current) >= settings.min_results
    out: list[FeatureDrift] = []
    ref_in = [r.inputs for r in reference if r.inputs is not None]
    cur_in = [r.inputs for r in current if r.inputs is not None]
    for key, title in CATEGORICAL.items():
        ref_c = Counter(categorical_value(x.get(key)) for x in ref_in)
        cur_c = Counter(categorical_value(x.get(key)) for x in cur_in)
        bins = sorted(ref_c) + sorted(set(cur_c) - set(ref_c))
        r, c = [ref_c[b] for b in bins], [cur_c[b] for b in bins]
        value = psi(r, c)
        out.append(FeatureDrift(f"input_{key}", title, "input", bins, r, c, value, _level(value, settings, enough)))
    for key, (title, unit, edges) in NUMERIC_BINS.items():
        labels = numeric_bin_labels(unit, edges)
        r, c = [0] * len(labels), [0] * len(labels)
        for x in ref_in:
            r[numeric_bin(x.get(key), edges)] += 1
        for x in cur_in:
            c[numeric_bin(x.get(key), edges)] += 1
        value = psi(r, c)
        out.append(FeatureDrift(f"input_{key}", title, "input", labels, r, c, value, _level(value, settings, enough)))
    for cls in CLASSES:
        out.append(score_drift(cls, [x.scores[cls] for x in reference], [x.scores[cls] for x in current],
                               settings, enough))
    return out


def score_drift(cls: str, reference: Sequence[float], current: Sequence[float], settings: MonitoringConfig,
                enough: bool) -> FeatureDrift:
    """One class's scores in the reference deciles."""
    title = f"Score: {cls}"
    if not reference:
        return FeatureDrift(f"score_{cls}", title, "score", [], [], [], 0.0, _level(0.0, settings, enough))
    edges = np.unique(np.quantile(np.asarray(reference, dtype=float), np.linspace(0.1, 0.9, 9)))
    bounds = [0.0, *edges.tolist(), 1.0]
    digits = next((d for d in range(2, 7) if len({f"{b:.{d}f}" for b in bounds}) == len(bounds)), 7)
    bins = [f"{lo:.{digits}f}-{hi:.{digits}f}" for lo, hi in zip(bounds, bounds[1:], strict=False)]
    r = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(bins)).tolist()
    c = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(bins)).tolist() \
        if len(current) else [0] * len(bins)
    value = psi(r, c)
    ks_p = None
    if len(reference) and len(current):
        from scipy.stats import ks_2samp  # scipy comes with scikit-learn

        ks_p = float(ks_2samp(reference, current).pvalue)
    return FeatureDrift(f"score_{cls}", title, "score", bins, r, c, value, _level(value, settings, enough), ks_p)


def positivity(results: Sequence[AnalysedResult]) -> float | None:
    return sum(1 for r in results if r.positives) / len(results) if results else None


def weekly_positivity(results: Sequence[AnalysedResult]) -> list[WeekRate]:
    counts: dict[str, list[int]] = {}
    for r in results:
        year, week, _ = r.at.isocalendar()
        n_pos = counts.setdefault(f"{year}-W{week:02d}", [0, 0])
        n_pos[0] += 1
        n_pos[1] += 1 if r.positives else 0
    return [WeekRate(k, v[0], v[1]) for k, v in sorted(counts.items())]


def windows(db: Database, settings: MonitoringConfig, now: datetime
            ) -> tuple[list[AnalysedResult], list[AnalysedResult], tuple[datetime | None, datetime | None],
                       tuple[datetime | None, datetime | None]]:
    """(reference results, current results, reference [since, until), current [since, until))."""
    everything = db.analysed_results(until=now + timedelta(seconds=1))
    if not everything:
        return [], [], (None, None), (None, None)
    first = everything[0].at
    if settings.reference_results is not None:
        reference = everything[:settings.reference_results]
        ref_until = (reference[-1].at + timedelta(microseconds=1)) if reference else first
    else:
        ref_until = first + timedelta(weeks=settings.reference_weeks)
        reference = [r for r in everything if r.at < ref_until]
    since = max(ref_until, now - timedelta(days=settings.window_days))
    current = [r for r in everything[len(reference):] if r.at >= since]
    return reference, current, (first, ref_until), (since, now)


def drift_report(db: Database, settings: MonitoringConfig, now: datetime | None = None) -> DriftReport:
    """The drift of the current window against the reference, from the log database."""
    now = now or utcnow()
    reference, current, ref_window, cur_window = windows(db, settings, now)
    report = DriftReport(now, ref_window, cur_window, len(reference), len(current), settings.min_results)
    report.features = compare(reference, current, settings)
    report.reference_positivity = positivity(reference)
    report.current_positivity = positivity(current)
    report.weeks = weekly_positivity(db.analysed_results(since=now - timedelta(weeks=26)))
    return report
