"""/metrics in Prometheus text format, read from the log database at each scrape.

The counters are counts of rows (instances, analyses, failed delivery attempts, alerts), not numbers
kept in the process: they survive restarts, agree with the database by construction, and every node
sharing one PostgreSQL database reports the same figures. The histograms are built from the recorded
times (time to result per series, model seconds per analysis) with fixed buckets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from ihd_node.store import DELIVERY_STATES, SERIES_STATES, Database

TIME_TO_RESULT_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0)
MODEL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class Live:
    """What only the running process knows."""

    queue_depth: int
    model_loaded: bool
    spool_free_bytes: int | None


def _histogram(name: str, doc: str, values: Sequence[float], buckets: Sequence[float]) -> HistogramMetricFamily:
    counts, cumulative = [], 0
    ordered = sorted(values)
    i = 0
    for bound in buckets:
        while i < len(ordered) and ordered[i] <= bound:
            i += 1
        cumulative = i
        counts.append((repr(float(bound)), cumulative))
    counts.append(("+Inf", len(ordered)))
    return HistogramMetricFamily(name, doc, buckets=counts, sum_value=float(sum(ordered)))


class DatabaseCollector:
    def __init__(self, db: Database, live: Callable[[], Live], kinds: Mapping[str, str] | None = None) -> None:
        self.db = db
        self.live = live
        self.kinds = dict(kinds or {})  # destination name -> kind (dicom, dicomweb, hl7, fhir)

    def collect(self) -> Iterator[Metric]:
        counts = self.db.metric_counts()
        yield CounterMetricFamily("ihd_instances_received", "DICOM instances received and recorded.",
                                  counts.instances)
        series = GaugeMetricFamily("ihd_series", "Series by state.", labels=["state"])
        for state in SERIES_STATES:
            series.add_metric([state], counts.series_by_state.get(state, 0))
        yield series
        done = CounterMetricFamily("ihd_analyses", "Analyses done, by result.", labels=["result"])
        done.add_metric(["positive"], counts.analyses_by_positive.get(True, 0))
        done.add_metric(["negative"], counts.analyses_by_positive.get(False, 0))
        yield done
        # Last instance received -> results accepted by every destination (or analysed, with none).
        seconds = [((delivered or analysed) - last).total_seconds() for last, delivered, analysed in counts.finished]
        yield _histogram("ihd_time_to_result_seconds", "Last instance received to result delivered (or analysed "
                         "when there are no destinations).", [max(0.0, v) for v in seconds], TIME_TO_RESULT_BUCKETS)
        yield _histogram("ihd_model_seconds", "Model inference time per analysis.", counts.inference_seconds,
                         MODEL_BUCKETS)
        failures = CounterMetricFamily("ihd_delivery_failures", "Delivery attempts that did not store the object, "
                                       "by outcome (retry, rejected, failed).", labels=["outcome"])
        for outcome in ("retry", "rejected", "failed"):
            failures.add_metric([outcome], counts.attempts_by_outcome.get(outcome, 0))
        yield failures
        outbox = GaugeMetricFamily("ihd_deliveries", "Result deliveries by status.", labels=["status"])
        for status in DELIVERY_STATES:
            outbox.add_metric([status], counts.deliveries_by_status.get(status, 0))
        yield outbox
        per_dest = GaugeMetricFamily("ihd_destination_deliveries", "Outbox rows by destination, its kind (dicom, "
                                     "dicomweb, hl7, fhir) and status.", labels=["destination", "kind", "status"])
        for (dest, status), n in sorted(self.db.deliveries_by_destination().items()):
            per_dest.add_metric([dest, self.kinds.get(dest, "unknown"), status], n)
        yield per_dest
        sent = GaugeMetricFamily("ihd_alerts", "Alerts by status.", labels=["status"])
        for status in ("pending", "sent", "failed", "rejected"):
            sent.add_metric([status], counts.alerts_by_status.get(status, 0))
        yield sent
        live = self.live()
        yield GaugeMetricFamily("ihd_queue_depth", "Series waiting for the model in this process.",
                                value=live.queue_depth)
        yield GaugeMetricFamily("ihd_model_loaded", "1 when this process has its model loaded.",
                                value=1 if live.model_loaded else 0)
        if live.spool_free_bytes is not None:
            yield GaugeMetricFamily("ihd_spool_free_bytes", "Free bytes on the spool's file system.",
                                    value=live.spool_free_bytes)


def registry(db: Database, live: Callable[[], Live], kinds: Mapping[str, str] | None = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DatabaseCollector(db, live, kinds))  # type: ignore[arg-type]
    return reg
