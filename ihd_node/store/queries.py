"""What the admin commands (status, log, retry), the web console and /metrics read.

Read-only units of work, each in one read session, so a page or a report sees one consistent state. They
return detached rows (and plain counts) in small dataclasses; the callers only format them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ihd_node.store.engine import DatabaseEngine
from ihd_node.store.schema import (
    IN_FLIGHT_STATES,
    Alert,
    Analysis,
    Delivery,
    DeliveryAttempt,
    Event,
    Instance,
    Series,
    Study,
)


@dataclass(frozen=True)
class StatusRows:
    """`ihd-node status`: series in flight, the outbox, and failures that still need an admin."""

    in_flight: list[Series]
    sent_by_series: dict[int, int]  # series id -> deliveries sent
    pending_by_series: dict[int, int]  # series id -> deliveries pending
    pending: int
    oldest_pending: datetime | None
    next_attempt: datetime | None
    failed_series: list[Series]  # newest first, at most 50
    failed_deliveries: list[Delivery]  # of those series, newest first, at most 50
    retrying: list[Delivery]  # pending after at least one attempt, next due first, at most 50


@dataclass(frozen=True)
class RecentStudies:
    """`ihd-node log`: studies with an instance received since a time, their series and latest analyses."""

    studies: list[Study]  # newest first
    series: list[Series]  # of those studies, first received first
    latest: dict[int, Analysis]  # series id -> its latest analysis


@dataclass(frozen=True)
class SeriesSummary:
    """One series on the console's list page."""

    series: Series
    analysis: Analysis | None  # the latest
    deliveries: dict[str, int]  # status -> count, of the latest analysis
    alerts: dict[str, int]  # status -> count


@dataclass(frozen=True)
class SeriesDetail:
    """One series on the console's study page."""

    series: Series
    analysis: Analysis | None  # the latest
    deliveries: list[Delivery]  # of the latest analysis, by destination
    attempts: dict[int, list[DeliveryAttempt]]  # delivery id -> its attempts, in order
    alerts: list[Alert]


@dataclass(frozen=True)
class StudyDetail:
    study: Study
    series: list[SeriesDetail]  # first received first
    events: list[Event]  # newest first, at most 50


@dataclass(frozen=True)
class MetricCounts:
    """The row counts and recorded times /metrics reports."""

    instances: int
    series_by_state: dict[str, int]
    analyses_by_positive: dict[bool, int]  # True: some class positive
    inference_seconds: list[float]
    finished: list[tuple[datetime, datetime | None, datetime]]  # last_received, delivered, analysis_finished
    attempts_by_outcome: dict[str, int]
    deliveries_by_status: dict[str, int]
    alerts_by_status: dict[str, int]


class QueryStore(DatabaseEngine):
    """The read queries of the admin commands, the console and /metrics."""

    def status_rows(self) -> StatusRows:
        with self.read_session() as s:
            in_flight = list(
                s.scalars(select(Series).where(Series.state.in_(IN_FLIGHT_STATES)).order_by(Series.last_received))
            )
            by_series = {
                status: dict(
                    s.execute(
                        select(Delivery.series_id, func.count())
                        .where(Delivery.status == status)
                        .group_by(Delivery.series_id)
                    ).all()
                )
                for status in ("sent", "pending")
            }
            count, oldest, next_at = s.execute(
                select(func.count(), func.min(Delivery.created_at), func.min(Delivery.next_attempt_at)).where(
                    Delivery.status == "pending"
                )
            ).one()
            failed_series = list(
                s.scalars(select(Series).where(Series.state == "failed").order_by(Series.updated.desc()).limit(50))
            )
            failed_ids = [x.id for x in failed_series]
            failed_deliveries = (
                list(
                    s.scalars(
                        select(Delivery)
                        .where(Delivery.status.in_(("failed", "rejected")), Delivery.series_id.in_(failed_ids))
                        .order_by(Delivery.updated_at.desc())
                        .limit(50)
                    )
                )
                if failed_ids
                else []
            )
            retrying = list(
                s.scalars(
                    select(Delivery)
                    .where(Delivery.status == "pending", Delivery.attempts > 0)
                    .order_by(Delivery.next_attempt_at)
                    .limit(50)
                )
            )
        return StatusRows(in_flight, by_series["sent"], by_series["pending"], int(count or 0), oldest, next_at,
                          failed_series, failed_deliveries, retrying)

    def recent_studies(self, since: datetime) -> RecentStudies:
        with self.read_session() as s:
            studies = list(
                s.scalars(select(Study).where(Study.last_received >= since).order_by(Study.last_received.desc()))
            )
            ids = [st.id for st in studies]
            series = (
                list(s.scalars(select(Series).where(Series.study_id.in_(ids)).order_by(Series.first_received)))
                if ids
                else []
            )
            latest = self._latest_analyses(s, [x.id for x in series]) if series else {}
        return RecentStudies(studies, series, latest)

    @staticmethod
    def _latest_analyses(s: Session, series_ids: list[int]) -> dict[int, Analysis]:
        latest: dict[int, Analysis] = {}
        for a in s.scalars(
            select(Analysis).where(Analysis.series_id.in_(series_ids)).order_by(Analysis.revision)
        ):
            latest[a.series_id] = a  # ordered by revision: the last one wins
        return latest

    def pending_destinations_except(self, known: Collection[str]) -> list[str]:
        """Destinations of pending deliveries that are not in `known` (no longer configured), sorted."""
        with self.read_session() as s:
            return sorted({d for (d,) in s.execute(select(Delivery.destination).where(
                Delivery.status == "pending", Delivery.destination.not_in(list(known)))).all()})

    def series_overview(self, updated_since: datetime | None = None, limit: int = 200) -> list[SeriesSummary]:
        """The latest changed series (all, or those changed since `updated_since`), newest change first."""
        with self.read_session() as s:
            query = select(Series).join(Study)
            if updated_since is not None:
                query = query.where(Series.updated >= updated_since)
            series = list(s.scalars(query.order_by(Series.updated.desc()).limit(limit)))
            ids = [x.id for x in series]
            latest = self._latest_analyses(s, ids)
            deliveries: dict[int, dict[str, int]] = {}
            analysis_ids = [a.id for a in latest.values()]
            for sid, status in s.execute(select(Delivery.series_id, Delivery.status)
                                         .where(Delivery.analysis_id.in_(analysis_ids))):
                deliveries.setdefault(sid, {}).setdefault(status, 0)
                deliveries[sid][status] += 1
            alerts: dict[int, dict[str, int]] = {}
            for sid, status in s.execute(select(Alert.series_id, Alert.status).where(Alert.series_id.in_(ids))):
                alerts.setdefault(sid, {}).setdefault(status, 0)
                alerts[sid][status] += 1
        return [SeriesSummary(x, latest.get(x.id), deliveries.get(x.id, {}), alerts.get(x.id, {})) for x in series]

    def study_detail(self, study_instance_uid: str) -> StudyDetail | None:
        with self.read_session() as s:
            study = s.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one_or_none()
            if study is None:
                return None
            details = []
            for x in s.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.first_received)):
                analysis = s.scalars(select(Analysis).where(Analysis.series_id == x.id)
                                     .order_by(Analysis.revision.desc()).limit(1)).one_or_none()
                deliveries = list(s.scalars(select(Delivery).where(Delivery.analysis_id == analysis.id)
                                            .order_by(Delivery.destination, Delivery.id))) if analysis else []
                attempts: dict[int, list[DeliveryAttempt]] = {}
                for att in s.scalars(select(DeliveryAttempt).where(
                        DeliveryAttempt.delivery_id.in_([d.id for d in deliveries])).order_by(DeliveryAttempt.id)):
                    attempts.setdefault(att.delivery_id, []).append(att)
                alerts = list(s.scalars(select(Alert).where(Alert.series_id == x.id).order_by(Alert.id)))
                details.append(SeriesDetail(x, analysis, deliveries, attempts, alerts))
            events = list(s.scalars(select(Event).where(Event.study_instance_uid == study_instance_uid)
                                    .order_by(Event.at.desc(), Event.id.desc()).limit(50)))
        return StudyDetail(study, details, events)

    def metric_counts(self) -> MetricCounts:
        with self.read_session() as s:
            instances = s.scalar(select(func.count()).select_from(Instance)) or 0
            by_state = dict(s.execute(select(Series.state, func.count()).group_by(Series.state)).all())
            analyses = dict(s.execute(
                select(Analysis.positive_classes != "", func.count()).group_by(Analysis.positive_classes != "")
            ).all())
            inference = [v for (v,) in s.execute(
                select(Analysis.inference_seconds).where(Analysis.inference_seconds.is_not(None))).all()]
            finished = [tuple(r) for r in s.execute(
                select(Series.last_received, Series.delivered, Series.analysis_finished)
                .where(Series.analysis_finished.is_not(None))).all()]
            attempts = dict(s.execute(
                select(DeliveryAttempt.outcome, func.count()).group_by(DeliveryAttempt.outcome)).all())
            deliveries = dict(s.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())
            alerts = dict(s.execute(select(Alert.status, func.count()).group_by(Alert.status)).all())
        return MetricCounts(int(instances), by_state, analyses, inference, finished,  # type: ignore[arg-type]
                            attempts, deliveries, alerts)
