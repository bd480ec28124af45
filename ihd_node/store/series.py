"""Series state: completion, completion evidence and MPPS, the series' own reads, and analysis rows."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update

from ihd_node.classes import CLASSES
from ihd_node.store.engine import DatabaseEngine
from ihd_node.store.outbox import ResultObject, enqueue
from ihd_node.store.schema import (
    SERIES_STATES,
    SERIES_TIMES,
    TIMING_KEYS,
    UNFINISHED_STATES,
    Alert,
    Analysis,
    Completion,
    Delivery,
    Instance,
    Mpps,
    MppsInstance,
    Series,
    utcnow,
)


class Superseded(Exception):
    """finish_analysis(expect_started=...) of an analysis whose series another worker has taken over."""


@dataclass(frozen=True)
class Candidate:
    series_instance_uid: str
    rule: str  # "quiet" or "max_wait"
    last_received: datetime | None = None  # as seen when judged; a later instance voids the judgement


class SeriesStore(DatabaseEngine):
    """Units of work on a series' state, from complete to analysed."""

    def series_to_complete(
        self, now: datetime, quiet_seconds: float, max_wait_seconds: float
    ) -> list[Candidate]:
        """Series in "received" that are complete now, with the rule that fired (quiet first)."""
        quiet_before = now - timedelta(seconds=quiet_seconds)
        max_before = now - timedelta(seconds=max_wait_seconds)
        with self.read_session() as s:
            rows = s.execute(
                select(Series.series_instance_uid, Series.last_received, Series.association_released)
                .where(
                    Series.state == "received",
                    (Series.last_received <= max_before)
                    | ((Series.association_released.is_not(None)) & (Series.last_received <= quiet_before)),
                )
                .order_by(Series.last_received)
            ).all()
        return [
            Candidate(uid, "quiet" if released is not None and last <= quiet_before else "max_wait", last)
            for uid, last, released in rows
        ]

    def next_completion_time(self, quiet_seconds: float, max_wait_seconds: float) -> datetime | None:
        """Earliest time at which some received series may complete (lets the assembler sleep until then)."""
        with self.read_session() as s:
            rows = s.execute(
                select(Series.last_received, Series.association_released).where(Series.state == "received")
            ).all()
        times = [
            last + timedelta(seconds=quiet_seconds if released is not None else max_wait_seconds)
            for last, released in rows
        ]
        return min(times) if times else None

    # -------------------------------------------------------- series state

    def set_series_state(
        self,
        series_instance_uid: str,
        state: str,
        reason: str | None = None,
        *,
        expect: str | Sequence[str] | None = None,
        unchanged_since: datetime | None = None,
        completion_rule: str | None = None,
        **times: datetime,
    ) -> bool:
        """Move a series to `state`; with `expect`, only if it is in that state now (compare-and-set).

        With `unchanged_since`, only if no instance arrived after that time. `times` sets time columns by
        name (completed=, analysis_started=, ...). Returns False when the series
        is missing or not in an expected state (e.g. a late instance reopened it meanwhile).
        """
        if state not in SERIES_STATES:
            raise ValueError(f"unknown series state {state!r}")
        unknown = set(times) - set(SERIES_TIMES)
        if unknown:
            raise ValueError(f"unknown series time column(s): {sorted(unknown)}")
        with self.session() as s:
            series = s.scalars(
                select(Series).where(Series.series_instance_uid == series_instance_uid)
            ).one_or_none()
            if series is None:
                return False
            if expect is not None:
                allowed = (expect,) if isinstance(expect, str) else tuple(expect)
                if series.state not in allowed:
                    return False
            if unchanged_since is not None and series.last_received > unchanged_since:
                return False
            series.state = state
            series.reason = reason
            if completion_rule is not None:
                series.completion_rule = completion_rule
            for name, value in times.items():
                setattr(series, name, value)
            series.updated = utcnow()
            return True

    def mark_complete(self, series_instance_uid: str, rule: str, when: datetime | None = None,
                      last_received: datetime | None = None) -> bool:
        """received -> complete, noting which rule fired.

        False if it is no longer "received", or an instance arrived after `last_received` (the time the
        completion was judged on): that series is not quiet after all and waits for the next tick.
        """
        return self.set_series_state(
            series_instance_uid,
            "complete",
            expect="received",
            unchanged_since=last_received,
            completion_rule=rule,
            completed=when or utcnow(),
        )

    # -------------------------------------------------------- completion evidence and MPPS

    def record_completion(self, series_instance_uid: str, *, rule: str, n_instances: int, evidence: str,
                          preliminary: str | None, at: datetime | None = None) -> None:
        with self.session() as s:
            s.add(Completion(series_instance_uid=series_instance_uid, at=at or utcnow(), rule=rule,
                             n_instances=n_instances, evidence=evidence, preliminary=preliminary))

    def latest_completion(self, series_instance_uid: str) -> Completion | None:
        with self.read_session() as s:
            return s.scalars(
                select(Completion)
                .where(Completion.series_instance_uid == series_instance_uid)
                .order_by(Completion.id.desc())
                .limit(1)
            ).one_or_none()

    def note_series_waiting(self, series_instance_uid: str, reason: str) -> bool:
        """Keep a received series' reason up to date with what holds it back (no state change)."""
        with self.session() as s:
            result = s.execute(
                update(Series)
                .where(Series.series_instance_uid == series_instance_uid, Series.state == "received")
                .values(reason=reason[:2000])
            )
            return bool(result.rowcount)

    def save_mpps(self, sop_instance_uid: str, *, status: str, calling_aet: str | None, trusted: bool,
                  study_instance_uid: str | None, instances: Sequence[tuple[str, str, str | None]] | None,
                  now: datetime | None = None) -> tuple[str | None, str]:
        """Create or update one MPPS; `instances` (series UID, SOP UID, class UID) replaces its list when
        given. Returns (previous status or None when new, status now)."""
        now = now or utcnow()
        with self.session() as s:
            row = s.scalars(select(Mpps).where(Mpps.sop_instance_uid == sop_instance_uid)).one_or_none()
            previous = None if row is None else row.status
            if row is None:
                row = Mpps(sop_instance_uid=sop_instance_uid, created_at=now, status=status)
                s.add(row)
            row.status, row.updated_at = status, now
            row.calling_aet = (calling_aet or row.calling_aet or "")[:16] or None
            row.trusted = int(trusted)
            row.study_instance_uid = study_instance_uid or row.study_instance_uid
            s.flush()
            if instances is not None:
                s.execute(MppsInstance.__table__.delete().where(MppsInstance.mpps_id == row.id))
                seen = set()
                for series_uid, sop_uid, class_uid in instances:
                    if sop_uid in seen:
                        continue
                    seen.add(sop_uid)
                    s.add(MppsInstance(mpps_id=row.id, series_instance_uid=series_uid[:64],
                                       sop_instance_uid=sop_uid[:64], sop_class_uid=(class_uid or "")[:64] or None))
            return previous, status

    def get_mpps(self, sop_instance_uid: str) -> Mpps | None:
        with self.read_session() as s:
            return s.scalars(select(Mpps).where(Mpps.sop_instance_uid == sop_instance_uid)).one_or_none()

    def mpps_instance_count(self, sop_instance_uid: str) -> int:
        with self.read_session() as s:
            return int(s.scalar(
                select(func.count()).select_from(MppsInstance).join(Mpps, Mpps.id == MppsInstance.mpps_id)
                .where(Mpps.sop_instance_uid == sop_instance_uid)) or 0)

    def mpps_lists(self, series_instance_uid: str) -> list[tuple[str, frozenset[str]]]:
        """(MPPS UID, SOP Instance UIDs listed for this series) of each trusted COMPLETED MPPS."""
        with self.read_session() as s:
            rows = s.execute(
                select(Mpps.sop_instance_uid, MppsInstance.sop_instance_uid)
                .join(MppsInstance, MppsInstance.mpps_id == Mpps.id)
                .where(MppsInstance.series_instance_uid == series_instance_uid, Mpps.status == "COMPLETED",
                       Mpps.trusted == 1)
            ).all()
        lists: dict[str, set[str]] = {}
        for mpps_uid, sop_uid in rows:
            lists.setdefault(mpps_uid, set()).add(sop_uid)
        return [(k, frozenset(v)) for k, v in sorted(lists.items())]

    def series_with_mpps(self) -> list[str]:
        """Received series that a trusted COMPLETED MPPS lists (they may be complete before the quiet time)."""
        with self.read_session() as s:
            return list(
                s.scalars(
                    select(Series.series_instance_uid)
                    .join(MppsInstance, MppsInstance.series_instance_uid == Series.series_instance_uid)
                    .join(Mpps, Mpps.id == MppsInstance.mpps_id)
                    .where(Series.state == "received", Mpps.status == "COMPLETED", Mpps.trusted == 1)
                    .distinct()
                )
            )

    def get_series(self, series_instance_uid: str) -> Series | None:
        with self.read_session() as s:
            return s.scalars(
                select(Series).where(Series.series_instance_uid == series_instance_uid)
            ).one_or_none()

    def series_instances(self, series_instance_uid: str) -> list[Instance]:
        """The series' instances (their spool paths feed load_volume)."""
        with self.read_session() as s:
            return list(
                s.scalars(
                    select(Instance)
                    .join(Series, Instance.series_id == Series.id)
                    .where(Series.series_instance_uid == series_instance_uid)
                    .order_by(Instance.id)
                )
            )

    def unfinished_series(self) -> list[Series]:
        """Series a restart must resume: received (assembler), complete and analyzing (analysis queue).

        Deliveries resume by themselves through due_deliveries()."""
        with self.read_session() as s:
            return list(
                s.scalars(
                    select(Series).where(Series.state.in_(UNFINISHED_STATES)).order_by(Series.last_received)
                )
            )

    def series_in_state(self, *states: str) -> list[Series]:
        with self.read_session() as s:
            return list(
                s.scalars(select(Series).where(Series.state.in_(states)).order_by(Series.last_received))
            )

    def spool_expired(self, now: datetime, keep_hours: float) -> list[Series]:
        """Delivered, analyzed or ignored series whose received files may go (retention.spool_keep_hours)."""
        before = now - timedelta(hours=keep_hours)
        with self.read_session() as s:
            return list(
                s.scalars(
                    select(Series).where(
                        Series.state.in_(("delivered", "analyzed", "ignored", "not_chosen")),
                        Series.spool_removed.is_(None),
                        Series.updated <= before,
                    )
                )
            )

    def mark_spool_removed(self, series_instance_uid: str, when: datetime | None = None) -> None:
        with self.session() as s:
            s.execute(
                update(Series)
                .where(Series.series_instance_uid == series_instance_uid)
                .values(spool_removed=when or utcnow())
            )

    # -------------------------------------------------------- analysis (its deliveries and alerts enqueued with it)

    def finish_analysis(
        self,
        series_instance_uid: str,
        *,
        model_name: str,
        model_version: str,
        probabilities: Mapping[str, float],
        positive_classes: Sequence[str],
        thresholds: Mapping[str, float],
        n_slices: int,
        objects: Sequence[ResultObject],
        destinations: Sequence[str],
        alert_channels: Sequence[str] = (),
        n_model_slices: int | None = None,
        sr_sop_instance_uid: str | None = None,
        n_secondary_captures: int = 0,
        timings: Mapping[str, float] | None = None,
        started: datetime | None = None,
        now: datetime | None = None,
        expect_started: datetime | None = None,
        source_lossy: bool | None = None,
        settings_key: str | None = None,
        messages: Mapping[str, Sequence[ResultObject]] | None = None,
    ) -> Analysis:
        """Record an analysis and enqueue its objects for every destination in ONE transaction.

        `destinations` get every object (DICOM and DICOMweb ones); `messages` {destination: files} are the
        per-destination HL7 / FHIR message files (and a DICOMweb destination's own object list), queued
        FIRST so that with equal due times the message leaves no later than the SR.

        Write the result files first: after this commit the outbox may send them at any time. A crash before
        the commit leaves the series "analyzing", which a restart analyzes again (same deterministic UIDs).
        Older pending deliveries of the series are cancelled (a revised SR replaces them). If a late instance
        reopened the series during the analysis, it stays "received" (these results still go out; the next
        analysis supersedes them).

        expect_started (multi-machine workers): record it only if the series is still this analysis' - state
        analyzing (or reopened) with analysis_started unchanged - else raise Superseded: a worker thought
        dead has finished after another took its series over, and must not add a second revision."""
        now = now or utcnow()
        missing = set(CLASSES) - set(probabilities)
        if missing:
            raise ValueError(f"probabilities lack {sorted(missing)}")
        timings = dict(timings or {})
        with self.session() as s:
            series = s.scalars(select(Series).where(Series.series_instance_uid == series_instance_uid)).one()
            if expect_started is not None and (
                series.state not in ("analyzing", "received") or series.analysis_started != expect_started
            ):
                raise Superseded(f"series {series_instance_uid} is {series.state}, analysis started "
                                 f"{series.analysis_started}, not {expect_started}")
            series.revision += 1
            analysis = Analysis(
                series=series,
                revision=series.revision,
                model_name=model_name,
                model_version=model_version,
                positive_classes=",".join(c for c in CLASSES if c in set(positive_classes)),
                thresholds=json.dumps(dict(thresholds), sort_keys=True),
                source_lossy=source_lossy,
                settings_key=settings_key,
                n_slices=n_slices,
                n_model_slices=n_model_slices,
                sr_sop_instance_uid=sr_sop_instance_uid,
                n_secondary_captures=n_secondary_captures,
                created_at=now,
                **{f"p_{c}": float(probabilities[c]) for c in CLASSES},
                **{f"{k}_seconds": timings.get(k) for k in TIMING_KEYS},
            )
            s.add(analysis)
            s.flush()
            s.execute(
                update(Delivery)
                .where(Delivery.series_id == series.id, Delivery.status == "pending")
                .values(status="cancelled", last_error="superseded by a newer analysis", updated_at=now)
            )
            for dest, files in (messages or {}).items():
                for obj in files:
                    enqueue(s, analysis, series, dest, obj, now)
            for dest in destinations:
                for obj in objects:
                    enqueue(s, analysis, series, dest, obj, now)
            if analysis.positive_classes:  # alerts announce positive findings only
                for channel in alert_channels:
                    s.add(Alert(analysis_id=analysis.id, series=series, revision=analysis.revision, channel=channel,
                                status="pending", attempts=0, next_attempt_at=now, created_at=now, updated_at=now))
            began = started or series.analysis_started
            reopened = series.state == "received" and began is not None and series.last_received > began
            if not reopened:  # a late instance during the analysis put it back to "received": keep that
                series.state = "delivering" if (destinations and objects) or any((messages or {}).values()) \
                    else "analyzed"
                series.reason = None
            series.analysis_started = started or series.analysis_started
            series.analysis_finished = now
            series.delivered = None
            series.updated = now
            return analysis


    def get_analysis(self, analysis_id: int) -> Analysis | None:
        with self.read_session() as s:
            return s.get(Analysis, analysis_id)

    def latest_analysis(self, series_instance_uid: str) -> Analysis | None:
        with self.read_session() as s:
            return s.scalars(
                select(Analysis)
                .join(Series, Analysis.series_id == Series.id)
                .where(Series.series_instance_uid == series_instance_uid)
                .order_by(Analysis.revision.desc())
                .limit(1)
            ).one_or_none()
