"""The outboxes: result deliveries and alerts, and the ONE retry policy both follow.

A try that may succeed later (no answer, out of resources, an alert channel down) is retried with the
same exponential backoff on every outbox, until the row has waited `give_up_after_seconds` since it was
queued; then it is failed with the last reason. RetryPolicy is that rule; the delivery.* config keys
(retry_initial_seconds, retry_max_seconds, give_up_after_seconds) set it for deliveries and alerts alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ihd_node.store.engine import DatabaseEngine
from ihd_node.store.schema import Alert, Analysis, Delivery, DeliveryAttempt, DriftAlert, Series, utcnow


@dataclass(frozen=True)
class AttemptResult:
    delivery_status: str  # pending (will retry), sent, rejected, failed
    next_attempt_at: datetime | None
    series_instance_uid: str
    series_state: str | None  # "delivered" or "failed" when this attempt finished the series, else None


@dataclass(frozen=True)
class ResultObject:
    """One file to send: an SR or a secondary capture written under storage.results_dir."""

    sop_instance_uid: str
    sop_class_uid: str
    path: str | Path


def classify_status(status: int | None) -> str:
    """sent (success or warning), retry (out of resources / no answer) or rejected (any other failure)."""
    if status is None:
        return "retry"
    if status == 0x0000 or status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return "sent"
    if 0xA700 <= status <= 0xA7FF:  # Out of Resources: the PACS may have room later
        return "retry"
    return "rejected"


class RetrySettings(Protocol):
    """The config keys that set the retry policy (config.DeliveryConfig has them)."""

    retry_initial_seconds: float
    retry_max_seconds: float
    give_up_after_seconds: float


@dataclass(frozen=True)
class RetryPolicy:
    """When to try an outbox row again after a failed try, and when to give up on it."""

    initial_seconds: float  # wait after the first failed try; doubles per try
    max_seconds: float  # longest wait between tries
    give_up_after_seconds: float  # counted from when the row was queued (or re-queued)

    @classmethod
    def of(cls, settings: RetryPolicy | RetrySettings) -> RetryPolicy:
        if isinstance(settings, RetryPolicy):
            return settings
        return cls(settings.retry_initial_seconds, settings.retry_max_seconds, settings.give_up_after_seconds)

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after `attempts` failed tries (exponential, capped)."""
        return min(self.initial_seconds * 2.0 ** min(max(attempts - 1, 0), 40), self.max_seconds)  # no overflow

    def next_attempt(self, attempts: int, queued_at: datetime, now: datetime) -> datetime | None:
        """When to try again after `attempts` tries, the last one failed at `now`; None: give up."""
        if (now - queued_at).total_seconds() >= self.give_up_after_seconds:
            return None
        return now + timedelta(seconds=self.backoff(attempts))


def _retry_or_give_up(row: Delivery | Alert | DriftAlert, policy: RetryPolicy, now: datetime,
                      error: str | None) -> bool:
    """Book a retryable failed try on an outbox row (its attempts already count it). True: gave up."""
    retry_at = policy.next_attempt(row.attempts, row.created_at, now)
    if retry_at is None:
        row.status = "failed"
        row.last_error = f"gave up after {row.attempts} attempts: {error or 'no answer'}"
        return True
    row.next_attempt_at = retry_at
    return False



def book_alert_attempt(row: Alert | DriftAlert, outcome: str, error: str | None, policy: RetryPolicy,
                       now: datetime) -> None:
    """One attempt on an alert-outbox row (finding alerts and drift alerts share the columns): sent,
    rejected (resending cannot help) or retried by the policy until it gives up."""
    row.attempts += 1
    row.last_error = error
    row.updated_at = now
    if outcome == "sent":
        row.status, row.sent_at = "sent", now
    elif outcome == "rejected":
        row.status = "rejected"
    else:
        _retry_or_give_up(row, policy, now, error)


class OutboxStore(DatabaseEngine):
    """Units of work on the delivery and alert outboxes."""

    def enqueue_delivery(
        self, analysis_id: int, destination: str, obj: ResultObject, now: datetime | None = None
    ) -> int:
        """Add one object for one destination to the outbox (idempotent per destination and SOP UID)."""
        now = now or utcnow()
        with self.session() as s:
            analysis = s.get(Analysis, analysis_id)
            if analysis is None:
                raise ValueError(f"no analysis with id {analysis_id}")
            return enqueue(s, analysis, analysis.series, destination, obj, now).id

    def _due(self, outbox: type[Delivery] | type[Alert], now: datetime | None, limit: int) -> list[Any]:
        """Pending rows of an outbox (deliveries or alerts) whose next attempt is due, oldest first."""
        now = now or utcnow()
        with self.read_session() as s:
            return list(
                s.scalars(
                    select(outbox)
                    .where(outbox.status == "pending", outbox.next_attempt_at <= now)
                    .order_by(outbox.next_attempt_at, outbox.id)
                    .limit(limit)
                )
            )

    def _next_attempt(self, outbox: type[Delivery] | type[Alert]) -> datetime | None:
        with self.read_session() as s:
            return s.scalar(select(func.min(outbox.next_attempt_at)).where(outbox.status == "pending"))

    def due_deliveries(self, now: datetime | None = None, limit: int = 100) -> list[Delivery]:
        """Pending outbox rows whose next attempt is due, oldest first."""
        return self._due(Delivery, now, limit)

    def next_delivery_time(self) -> datetime | None:
        return self._next_attempt(Delivery)

    def record_attempt(
        self,
        delivery_id: int,
        *,
        status: int | None,
        error: str | None = None,
        policy: RetryPolicy | RetrySettings,
        now: datetime | None = None,
        seconds: float | None = None,
        outcome: str | None = None,
    ) -> AttemptResult:
        """Book one send attempt: success/warning -> sent; refusal -> rejected (no retry); no answer or
        out-of-resources -> retried by the RetryPolicy until it gives up -> failed.

        `outcome` ("sent", "retry", "rejected"): the answer of a non-DICOM transport (HL7 ACK, HTTP status),
        booked as given instead of classifying a DIMSE status; `status` is then None.

        `policy`: a RetryPolicy or the config keys that set it (config.DeliveryConfig). When no delivery of
        the series' latest analysis is pending any more, the series becomes delivered (all sent) or failed
        (with why).
        """
        now = now or utcnow()
        policy = RetryPolicy.of(policy)
        with self.session() as s:
            d = s.get(Delivery, delivery_id)
            if d is None:
                raise ValueError(f"no delivery with id {delivery_id}")
            outcome = outcome or classify_status(status)
            cancelled = d.status == "cancelled"  # superseded while this attempt was under way
            d.attempts += 1
            d.last_status = status
            d.last_error = error
            d.updated_at = now
            if outcome == "sent":
                d.status, d.delivered_at = "sent", now
            elif cancelled:
                pass
            elif outcome == "rejected":
                d.status = "rejected"
                d.last_error = error or (f"refused with status 0x{status:04X}" if status is not None else "refused")
            elif _retry_or_give_up(d, policy, now, error):
                outcome = "failed"
            s.add(
                DeliveryAttempt(
                    delivery_id=d.id, at=now, outcome=outcome, status=status, error=error, seconds=seconds
                )
            )
            s.flush()
            series_state = _settle_series(s, d.series_id, now)
            return AttemptResult(
                d.status,
                d.next_attempt_at if d.status == "pending" else None,
                d.series.series_instance_uid,
                series_state,
            )

    def deliveries_by_destination(self) -> dict[tuple[str, str], int]:
        """{(destination, status): rows} over the whole outbox (for /metrics)."""
        with self.read_session() as s:
            rows = s.execute(select(Delivery.destination, Delivery.status, func.count())
                             .group_by(Delivery.destination, Delivery.status)).all()
            return {(dest, status): int(n) for dest, status, n in rows}

    def cancel_pending_deliveries(self, series_instance_uid: str, reason: str) -> int:
        now = utcnow()
        with self.session() as s:
            series_id = s.scalar(select(Series.id).where(Series.series_instance_uid == series_instance_uid))
            result = s.execute(
                update(Delivery)
                .where(Delivery.series_id == series_id, Delivery.status == "pending")
                .values(status="cancelled", last_error=reason, updated_at=now)
            )
            return int(result.rowcount or 0)

    def requeue_failed_deliveries(
        self, series_instance_uid: str | None = None, now: datetime | None = None
    ) -> dict[str, int]:
        """Put failed/rejected deliveries of each series' latest analysis back into the outbox (`ihd-node
        retry`): due now, attempts and the give-up clock start afresh (the attempt history stays in
        delivery_attempts), and a series that failed because of them is "delivering" again. Only the latest
        analysis: older ones were superseded. Returns {series UID: deliveries re-queued}."""
        now = now or utcnow()
        with self.session() as s:
            query = select(Delivery).where(Delivery.status.in_(("failed", "rejected")))
            if series_instance_uid is not None:
                query = query.join(Series, Delivery.series_id == Series.id).where(
                    Series.series_instance_uid == series_instance_uid
                )
            rows = list(s.scalars(query.order_by(Delivery.id)))
            latest = dict(
                s.execute(
                    select(Analysis.series_id, func.max(Analysis.id))
                    .where(Analysis.series_id.in_({d.series_id for d in rows}))
                    .group_by(Analysis.series_id)
                ).all()
            ) if rows else {}
            done: dict[str, int] = {}
            for d in rows:
                if d.analysis_id != latest.get(d.series_id):
                    continue
                d.status, d.attempts, d.next_attempt_at = "pending", 0, now
                d.created_at = d.updated_at = now
                d.last_error = f"re-queued by `ihd-node retry`; before: {d.last_error or d.last_status}"
                series = d.series
                if series.state == "failed":
                    series.state, series.reason, series.updated = "delivering", None, now
                done[series.series_instance_uid] = done.get(series.series_instance_uid, 0) + 1
            return done

    # -------------------------------------------------------- alert outbox

    def due_alerts(self, now: datetime | None = None, limit: int = 50) -> list[Alert]:
        return self._due(Alert, now, limit)

    def next_alert_time(self) -> datetime | None:
        return self._next_attempt(Alert)

    def record_alert_attempt(
        self,
        alert_id: int,
        *,
        outcome: str,
        error: str | None,
        policy: RetryPolicy | RetrySettings,
        now: datetime | None = None,
    ) -> Alert:
        """Book one alert attempt. outcome: sent, retry (by the same RetryPolicy as deliveries: backoff,
        then failed once it gives up) or rejected (the receiving server refused the content: resending
        cannot help)."""
        now = now or utcnow()
        policy = RetryPolicy.of(policy)
        with self.session() as s:
            a = s.get(Alert, alert_id)
            if a is None:
                raise ValueError(f"no alert with id {alert_id}")
            book_alert_attempt(a, outcome, error, policy, now)
            s.flush()
            return a

    def series_alerts(self, series_instance_uid: str) -> list[Alert]:
        with self.read_session() as s:
            return list(
                s.scalars(
                    select(Alert)
                    .join(Series, Alert.series_id == Series.id)
                    .where(Series.series_instance_uid == series_instance_uid)
                    .order_by(Alert.id)
                )
            )


def enqueue(
    s: Session, analysis: Analysis, series: Series, destination: str, obj: ResultObject, now: datetime
) -> Delivery:
    existing = s.scalars(
        select(Delivery).where(
            Delivery.destination == destination, Delivery.sop_instance_uid == obj.sop_instance_uid
        )
    ).one_or_none()
    if existing is not None:
        if existing.status != "sent" or existing.analysis_id != analysis.id:
            # Same deterministic UID from a new analysis (or a retry of a dead one): send it afresh.
            existing.analysis_id, existing.series = analysis.id, series
            existing.status, existing.next_attempt_at, existing.updated_at = "pending", now, now
            existing.path, existing.sop_class_uid = str(obj.path), obj.sop_class_uid
            existing.attempts, existing.created_at, existing.delivered_at = 0, now, None
        return existing
    row = Delivery(
        analysis_id=analysis.id,
        series=series,
        destination=destination,
        sop_instance_uid=obj.sop_instance_uid,
        sop_class_uid=obj.sop_class_uid,
        path=str(obj.path),
        status="pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
    s.add(row)
    s.flush()
    return row


# Result objects a destination may not take without losing the result: the SR and the captures carry the
# findings; the Segmentation and the key-image KOS are extras for viewers that use them. A destination that
# does not accept their SOP class in association negotiation (booked 0x0122) keeps its "rejected" rows with
# the reason, and the series still counts as delivered, with the reason saying what was not taken.
OPTIONAL_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
                    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection"}
NOT_SUPPORTED = 0x0122


def _settle_series(s: Session, series_id: int, now: datetime) -> str | None:
    """delivering -> delivered/failed once nothing of the latest analysis is pending."""
    series = s.get(Series, series_id)
    if series is None or series.state != "delivering":
        return None
    latest = s.scalar(select(func.max(Analysis.id)).where(Analysis.series_id == series_id))
    rows = s.execute(
        select(Delivery.status, Delivery.destination, Delivery.last_error, Delivery.sop_class_uid,
               Delivery.last_status).where(Delivery.analysis_id == latest)
    ).all()
    if any(status == "pending" for status, *_ in rows):
        return None
    not_taken = sorted({f"{dest}: {OPTIONAL_CLASSES[cls]}" for status, dest, _, cls, code in rows
                        if status == "rejected" and cls in OPTIONAL_CLASSES and code == NOT_SUPPORTED})
    bad = [(dest, err) for status, dest, err, cls, code in rows if status in ("failed", "rejected")
           and not (status == "rejected" and cls in OPTIONAL_CLASSES and code == NOT_SUPPORTED)]
    if bad:
        series.state = "failed"
        series.reason = f"{len(bad)} of {len(rows)} result deliveries failed; first: {bad[0][0]}: {bad[0][1]}"
    else:
        series.state = "delivered"
        series.delivered = now
        series.reason = (f"not accepted (SOP class not supported), the SR and captures went out: "
                         f"{', '.join(not_taken)}") if not_taken else None
    series.updated = now
    return series.state

