"""Drift monitoring's units of work: the input facts of analysed series, the analysed results over a
period, drift episodes and the drift alert outbox."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from ihd_node.classes import CLASSES
from ihd_node.store.engine import DatabaseEngine
from ihd_node.store.outbox import RetryPolicy, RetrySettings, book_alert_attempt
from ihd_node.store.schema import Analysis, DriftAlert, DriftEpisode, Series, SeriesInput, utcnow

INPUT_FIELDS = ("manufacturer", "model_name", "kernel", "enhanced", "slice_thickness", "kvp", "pixel_spacing")


@dataclass(frozen=True)
class AnalysedResult:
    """The latest analysis of one series with the series' input facts (None where not recorded)."""

    series_instance_uid: str
    at: datetime  # when the analysis was booked
    scores: dict[str, float]  # class -> probability
    positives: tuple[str, ...]
    inputs: dict[str, object] | None  # INPUT_FIELDS -> value; None for series analysed before they were kept


class MonitoringStore(DatabaseEngine):
    """Units of work of drift monitoring."""

    def record_series_inputs(self, series_instance_uid: str, facts: dict[str, object],
                             now: datetime | None = None) -> None:
        """Keep the input facts of a series (INPUT_FIELDS); a later analysis overwrites them."""
        unknown = set(facts) - set(INPUT_FIELDS)
        if unknown:
            raise ValueError(f"unknown input facts {sorted(unknown)}; known: {INPUT_FIELDS}")
        with self.session() as s:
            series_id = s.scalar(select(Series.id).where(Series.series_instance_uid == series_instance_uid))
            if series_id is None:
                raise ValueError(f"no series {series_instance_uid}")
            row = s.scalars(select(SeriesInput).where(SeriesInput.series_id == series_id)).one_or_none()
            if row is None:
                row = SeriesInput(series_id=series_id, enhanced=False)
                s.add(row)
            for key, value in facts.items():
                setattr(row, key, value)
            row.enhanced = bool(facts.get("enhanced", False))
            row.recorded_at = now or utcnow()

    def analysed_results(self, since: datetime | None = None, until: datetime | None = None) -> list[AnalysedResult]:
        """The latest analysis of every series analysed in [since, until), oldest first."""
        with self.read_session() as s:
            latest = select(func.max(Analysis.id)).group_by(Analysis.series_id)
            query = (select(Analysis, Series.series_instance_uid, SeriesInput)
                     .join(Series, Analysis.series_id == Series.id)
                     .outerjoin(SeriesInput, SeriesInput.series_id == Analysis.series_id)
                     .where(Analysis.id.in_(latest)))
            if since is not None:
                query = query.where(Analysis.created_at >= since)
            if until is not None:
                query = query.where(Analysis.created_at < until)
            rows = s.execute(query.order_by(Analysis.created_at, Analysis.id)).all()
        return [AnalysedResult(uid, a.created_at, {c: float(getattr(a, f"p_{c}")) for c in CLASSES},
                               tuple(a.positives()),
                               None if inp is None else {k: getattr(inp, k) for k in INPUT_FIELDS})
                for a, uid, inp in rows]

    def first_analysis_time(self) -> datetime | None:
        with self.read_session() as s:
            return s.scalar(select(func.min(Analysis.created_at)))

    # -------------------------------------------------------- drift episodes

    def open_drift_episode(self) -> DriftEpisode | None:
        with self.read_session() as s:
            return s.scalars(select(DriftEpisode).where(DriftEpisode.ended_at.is_(None))
                             .order_by(DriftEpisode.id.desc()).limit(1)).one_or_none()

    def drift_episodes(self, limit: int = 20) -> list[DriftEpisode]:
        with self.read_session() as s:
            return list(s.scalars(select(DriftEpisode).order_by(DriftEpisode.id.desc()).limit(limit)))

    def book_drift(self, *, reason: str, feature: str, psi: float, channels: list[str],
                   now: datetime | None = None) -> tuple[DriftEpisode, bool]:
        """Drift seen now: the open episode is brought up to date, or a new one opens with one pending alert
        per channel (in the same transaction). Returns (episode, whether it is new)."""
        now = now or utcnow()
        with self.session() as s:
            open_ = s.scalars(select(DriftEpisode).where(DriftEpisode.ended_at.is_(None))
                              .order_by(DriftEpisode.id.desc()).limit(1)).one_or_none()
            if open_ is not None:
                open_.reason, open_.worst_feature, open_.worst_psi, open_.checked_at = reason, feature, psi, now
                return open_, False
            episode = DriftEpisode(started_at=now, reason=reason, worst_feature=feature, worst_psi=psi,
                                   checked_at=now)
            s.add(episode)
            s.flush()
            for channel in channels:
                s.add(DriftAlert(episode_id=episode.id, channel=channel, status="pending", attempts=0,
                                 next_attempt_at=now, created_at=now, updated_at=now))
            return episode, True

    def end_drift(self, now: datetime | None = None) -> DriftEpisode | None:
        """No drift any more: the open episode (if any) ends now; returns it."""
        now = now or utcnow()
        with self.session() as s:
            open_ = s.scalars(select(DriftEpisode).where(DriftEpisode.ended_at.is_(None))).all()
            for episode in open_:
                episode.ended_at = episode.checked_at = now
            return open_[-1] if open_ else None

    # -------------------------------------------------------- drift alert outbox

    def due_drift_alerts(self, now: datetime | None = None, limit: int = 20) -> list[DriftAlert]:
        now = now or utcnow()
        with self.read_session() as s:
            return list(s.scalars(select(DriftAlert)
                                  .where(DriftAlert.status == "pending", DriftAlert.next_attempt_at <= now)
                                  .order_by(DriftAlert.next_attempt_at, DriftAlert.id).limit(limit)))

    def next_drift_alert_time(self) -> datetime | None:
        with self.read_session() as s:
            return s.scalar(select(func.min(DriftAlert.next_attempt_at)).where(DriftAlert.status == "pending"))

    def drift_alerts(self, episode_id: int | None = None) -> list[DriftAlert]:
        with self.read_session() as s:
            query = select(DriftAlert)
            if episode_id is not None:
                query = query.where(DriftAlert.episode_id == episode_id)
            return list(s.scalars(query.order_by(DriftAlert.id)))

    def record_drift_alert_attempt(self, alert_id: int, *, outcome: str, error: str | None,
                                   policy: RetryPolicy | RetrySettings, now: datetime | None = None) -> DriftAlert:
        """Book one attempt, by the same rules as the finding alerts (sent / retry with backoff / rejected)."""
        now = now or utcnow()
        policy = RetryPolicy.of(policy)
        with self.session() as s:
            a = s.get(DriftAlert, alert_id)
            if a is None:
                raise ValueError(f"no drift alert with id {alert_id}")
            book_alert_attempt(a, outcome, error, policy, now)
            s.flush()
            return a
