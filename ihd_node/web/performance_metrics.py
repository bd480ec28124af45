"""Prometheus gauges of local performance and drift, read from the log database at each scrape (like
ihd_node.web.metrics): per finding the local sensitivity, specificity, PPV, NPV and AUC with their 95 %
interval bounds as `<name>_low` / `<name>_high`, the reads counted and the results without a read; the drift
PSI per feature (as the node's latest drift check found it), whether a drift episode is open, and the positivity
rate of the reference and current windows. A figure that cannot be computed (no cases) has no sample rather than
a made-up value. Local performance is recomputed at most every CACHE_SECONDS."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from ihd_node.classes import CLASSES
from ihd_node.monitoring import PerformanceReport, local_performance
from ihd_node.monitoring.drift import DriftReport, drift_report
from ihd_node.store import Database

FIGURES = ("sensitivity", "specificity", "ppv", "npv", "auc")


CACHE_SECONDS = 60.0  # local performance is recomputed at most this often (Prometheus scrapes every ~15 s)


class PerformanceCollector:
    """`latest_drift`: the node's latest drift check (what the alerting judged), else computed at the scrape."""

    def __init__(self, db: Database, config: Any,
                 latest_drift: Callable[[], DriftReport | None] = lambda: None) -> None:
        self.db = db
        self.config = config
        self.latest_drift = latest_drift
        self._perf: tuple[float, PerformanceReport] | None = None
        self._lock = threading.Lock()

    def _performance(self) -> PerformanceReport:
        with self._lock:
            if self._perf is None or time.monotonic() - self._perf[0] > CACHE_SECONDS:
                self._perf = (time.monotonic(), local_performance(self.db))
            return self._perf[1]

    def collect(self) -> Iterator[Metric]:
        perf = self._performance()
        for figure in FIGURES:
            families = {part: GaugeMetricFamily(f"ihd_node_local_{figure}{suffix}",
                                                f"Local {figure.upper() if len(figure) == 3 else figure} against the "
                                                f"radiologists' reads{words} (all results).", labels=["finding"])
                        for part, suffix, words in (("value", "", ""), ("low", "_low", ": 95 % interval, low end"),
                                                    ("high", "_high", ": 95 % interval, high end"))}
            for c in CLASSES:
                cp = perf.classes[c]
                value, ci = getattr(cp, figure), getattr(cp, f"{figure}_ci")
                if value is not None:
                    families["value"].add_metric([c], value)
                if ci is not None:
                    families["low"].add_metric([c], ci[0])
                    families["high"].add_metric([c], ci[1])
            yield from families.values()
        counts = {name: GaugeMetricFamily(f"ihd_node_local_{name}", doc, labels=["finding"]) for name, doc in (
            ("n_read", "Results with a present or absent read of the finding."),
            ("n_unread", "Results without a read of the finding."),
            ("few_reads", "1 while the finding has too few reads for reliable figures."))}
        for c in CLASSES:
            cp = perf.classes[c]
            counts["n_read"].add_metric([c], cp.n_read)
            counts["n_unread"].add_metric([c], cp.n_unread)
            counts["few_reads"].add_metric([c], 1 if cp.few_reads else 0)
        yield from counts.values()
        if not self.config.monitoring.drift:
            return
        drift = self.latest_drift() or drift_report(self.db, self.config.monitoring)
        psi = GaugeMetricFamily("ihd_node_drift_psi", "Population stability index of a feature, current window "
                                "against the reference.", labels=["feature"])
        for f in drift.features:
            psi.add_metric([f.name], f.psi)
        yield psi
        yield GaugeMetricFamily("ihd_node_drift_judged", "1 when both windows have monitoring.min_results results.",
                                value=1 if drift.enough else 0)
        yield GaugeMetricFamily("ihd_node_drift_episode_open", "1 while a drift episode is open.",
                                value=1 if self.db.open_drift_episode() is not None else 0)
        rate = GaugeMetricFamily("ihd_node_positivity_rate", "Share of results positive for any finding.",
                                 labels=["window"])
        for window, value in (("reference", drift.reference_positivity), ("current", drift.current_positivity)):
            if value is not None:
                rate.add_metric([window], value)
        yield rate
