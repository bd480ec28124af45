"""The SQL of the intake and triage stages that the Database class does not carry: series of a SOP class
the node does not analyse, the series of one study, and what an association's end means for its series.

Functions take the Database; each runs in one short session of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from ihd_node.store.database import Database
from ihd_node.store.schema import Completion, Series, Study, utcnow


@dataclass(frozen=True)
class IgnoredArrival:
    """An instance of a series the node does not analyse (no file kept): what its row needs."""

    study_instance_uid: str
    series_instance_uid: str
    reason: str
    accession_number: str = ""
    modality: str = ""
    series_description: str = ""
    calling_aet: str = ""


def record_ignored(db: Database, arrival: IgnoredArrival, now: datetime | None = None) -> bool:
    """A series of a class the node does not analyse: a row in state "ignored", no files, no instances.

    True when the series is new (worth one event; not one per instance)."""
    now = now or utcnow()
    with db.session() as s:
        study = s.scalars(select(Study).where(
            Study.study_instance_uid == arrival.study_instance_uid)).one_or_none()
        if study is None:
            study = Study(study_instance_uid=arrival.study_instance_uid, first_received=now,
                          last_received=now, accession_number=arrival.accession_number[:16] or None)
            s.add(study)
        study.last_received = now
        series = s.scalars(select(Series).where(
            Series.series_instance_uid == arrival.series_instance_uid)).one_or_none()
        if series is None:
            s.add(Series(series_instance_uid=arrival.series_instance_uid, study=study, state="ignored",
                         reason=arrival.reason, modality=arrival.modality[:16] or None,
                         series_description=arrival.series_description[:64] or None, n_instances=1,
                         revision=0, calling_aet=arrival.calling_aet[:16], first_received=now,
                         last_received=now, updated=now))
            return True
        if series.state == "ignored":  # otherwise a CT series holds a stray object: leave its state alone
            series.n_instances += 1
            series.last_received = series.updated = now
        return False


def study_series(db: Database, study_uid: str) -> list[Series]:
    """Every series of one study, oldest first (the study choice ranks them)."""
    with db.read_session() as s:
        return list(s.scalars(select(Series).join(Study, Series.study_id == Study.id)
                              .where(Study.study_instance_uid == study_uid).order_by(Series.id)))


def note_open_series(db: Database, reason: str, association_id: str | None = None) -> int:
    """Give the received series whose last association ended without a release (A-ABORT, a dropped
    connection, or a node that died with it open) `reason`, and leave association_released empty: such a
    series may lack instances, so it waits for evidence or series.max_wait_seconds, never for the quiet
    rule. `association_id` None: every such series (start-up). Returns how many."""
    where = [Series.state == "received", Series.association_released.is_(None)]
    if association_id is not None:
        where.append(Series.last_association == association_id)
    with db.session() as s:
        result = s.execute(update(Series).where(*where).values(reason=reason[:2000]))
        return int(result.rowcount or 0)


def complete_series(db: Database, series_uid: str, rule: str, *, when: datetime, last_received: datetime | None,
                    at: datetime, evidence: str | None, preliminary: str | None) -> Series | None:
    """received -> complete with the rule that fired and, when the checks ran, its completions row, in one
    transaction: a crash or a database error between the two would leave a series judged incomplete to be
    analysed without its INCOMPLETE SERIES mark. None (nothing written) when the series is no longer "received" or
    an instance arrived after `last_received` (not quiet after all: the next tick looks again)."""
    with db.session() as s:
        series = s.scalars(select(Series).where(Series.series_instance_uid == series_uid)).one_or_none()
        if series is None or series.state != "received":
            return None
        if last_received is not None and series.last_received > last_received:
            return None
        series.state, series.reason, series.completion_rule = "complete", None, rule
        series.completed, series.updated = when, utcnow()
        if evidence is not None:
            s.add(Completion(series_instance_uid=series_uid, at=at, rule=rule, n_instances=series.n_instances,
                             evidence=evidence, preliminary=preliminary))
        return series
