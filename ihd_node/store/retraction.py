"""Retraction in the store: a result taken back (issue 18). The analysis keeps when, by whom and why; the
series becomes "retracted"; the retraction's notices (IOCM rejection note, withdrawn ORU, entered-in-error
FHIR report) are outbox rows of the retracted analysis, queued in the same transaction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import select, update

from ihd_node.store.engine import DatabaseEngine
from ihd_node.store.outbox import ResultObject, enqueue
from ihd_node.store.schema import Analysis, Delivery, Series, utcnow


class NotRetractable(ValueError):
    """The series is unknown, has no analysis, or its latest analysis is retracted already (says which)."""


class RetractionStore(DatabaseEngine):
    def retraction_target(self, series_instance_uid: str) -> Analysis:
        """The latest analysis of the series, which a retraction takes back; NotRetractable says why not."""
        with self.read_session() as s:
            return _target(s, series_instance_uid)

    def recent_retractions(self, limit: int = 10) -> list[Analysis]:
        """The latest retracted analyses, newest first (for `ihd-node status`)."""
        with self.read_session() as s:
            return list(s.scalars(select(Analysis).where(Analysis.retracted_at.is_not(None))
                                  .order_by(Analysis.retracted_at.desc()).limit(limit)))

    def analysis_deliveries(self, analysis_id: int) -> list[Delivery]:
        with self.read_session() as s:
            return list(s.scalars(select(Delivery).where(Delivery.analysis_id == analysis_id)
                                  .order_by(Delivery.id)))

    def retract_analysis(self, series_instance_uid: str, *, reason: str, who: str,
                         notices: Mapping[str, Sequence[ResultObject]], now: datetime | None = None) -> Analysis:
        """Book the retraction of the series' latest analysis and queue `notices` {destination: files} in
        ONE transaction (write the files first). Pending deliveries of the analysis are cancelled: the
        result is withdrawn, so what has not left yet does not leave."""
        now = now or utcnow()
        with self.session() as s:
            analysis = _target(s, series_instance_uid)
            analysis = s.get(Analysis, analysis.id)
            assert analysis is not None
            series = analysis.series
            analysis.retracted_at, analysis.retracted_by = now, who[:64]
            analysis.retraction_reason = reason
            s.execute(update(Delivery).where(Delivery.series_id == series.id, Delivery.status == "pending")
                      .values(status="cancelled", last_error="result retracted", updated_at=now))
            for dest, files in notices.items():
                for obj in files:
                    enqueue(s, analysis, series, dest, obj, now)
            series.state, series.reason, series.updated = "retracted", f"retracted by {who}: {reason}", now
            s.flush()
            return analysis


def _target(s, series_instance_uid: str) -> Analysis:  # noqa: ANN001 - a Session
    series = s.scalars(select(Series).where(Series.series_instance_uid == series_instance_uid)).one_or_none()
    if series is None:
        raise NotRetractable(f"no series {series_instance_uid} in the log database; `ihd-node status` and "
                             "`ihd-node log` list the analysed ones")
    analysis = s.scalars(select(Analysis).where(Analysis.series_id == series.id)
                         .order_by(Analysis.revision.desc()).limit(1)).one_or_none()
    if analysis is None:
        raise NotRetractable(f"series {series_instance_uid} ({series.state}) was never analysed: there is no "
                             "result to retract")
    if analysis.retracted_at is not None:
        raise NotRetractable(
            f"series {series_instance_uid}: its result (revision {analysis.revision}) was retracted already "
            f"on {analysis.retracted_at:%Y-%m-%d %H:%M} UTC by {analysis.retracted_by}: "
            f"{analysis.retraction_reason}; nothing more to do")
    return analysis
