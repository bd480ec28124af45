"""The audit trail (IHE ATNA) in the log database: `Database.audit(event)` is the one way every stage records
an audit message. It renders the event as a DICOM audit message (ihd_node.audit), checks it against the
PS3.15 schema and keeps it in `audit_messages` as pending; the node's audit sender
(ihd_node.node.audit) drains pending rows in order to the syslog collector and marks them sent. Rows stay
after sending: the database is also the local copy of the trail (`ihd-node log`-style reads, tests).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from ihd_node import nodelog
from ihd_node.audit import AuditEvent, AuditSource, render, schema_errors
from ihd_node.store.engine import DatabaseEngine
from ihd_node.store.schema import AuditMessage, AuditPatient, Meta, utcnow

CONFIG_HASH_KEY = "audit.config_sha256"  # meta: the effective configuration of the last node run


@dataclass(frozen=True)
class PendingAudit:
    id: int
    xml: str
    attempts: int


def default_source(ae_title: str = "IHD_AI", source_id: str | None = None, site_id: str | None = None) -> AuditSource:
    host = socket.gethostname()
    return AuditSource(source_id=source_id or f"ihd-node@{host}", site_id=site_id, ae_title=ae_title,
                       host=host, process=f"ihd-node:{os.getpid()}")


def audit_source(config: Any) -> AuditSource:
    """This installation as an audit source, from the config's `audit` and `node` sections."""
    return default_source(config.node.ae_title, config.audit.source_id, config.audit.site_id)


def without_patients(event: AuditEvent) -> AuditEvent:
    return replace(event, studies=tuple(replace(s, patient_id=None) for s in event.studies))


class AuditStore(DatabaseEngine):
    """Units of work on the audit trail."""

    audit_source_value: AuditSource | None = None
    audit_patient_ids = False  # audit.patient_ids: name patients (by ID) in the messages, remember them per study
    audit_wake: Callable[[], None] | None = None  # the audit sender's wake-up (set by the node)

    @property
    def audit_source(self) -> AuditSource:
        if self.audit_source_value is None:
            self.audit_source_value = default_source()
        return self.audit_source_value

    @audit_source.setter
    def audit_source(self, value: AuditSource) -> None:
        self.audit_source_value = value

    def configure_audit(self, config: Any) -> None:
        """Who this installation is in its audit messages, and whether they name patients (the config)."""
        self.audit_source = audit_source(config)
        self.audit_patient_ids = bool(config.audit.patient_ids)

    def audit(self, event: AuditEvent) -> int:
        """Record one audit message (pending for the collector) and return its row id.

        A message that fails the schema check is a bug of the node: it is kept with the reason in
        `schema_error` (and an ERROR log line) and sent all the same, so nothing is dropped silently."""
        if not self.audit_patient_ids:
            event = without_patients(event)  # no patient ID anywhere in the database (the default)
        with self.session() as s:
            for study in event.studies:
                if study.patient_id:
                    s.merge(AuditPatient(study_instance_uid=study.study_uid, patient_id=study.patient_id[:64]))
            missing = [st.study_uid for st in event.studies if not st.patient_id and self.audit_patient_ids]
            known = dict(s.execute(select(AuditPatient.study_instance_uid, AuditPatient.patient_id)
                                   .where(AuditPatient.study_instance_uid.in_(missing))).all()) if missing else {}
            try:
                xml = render(event, self.audit_source, known)
                errors = schema_errors(xml)
            except Exception as exc:  # noqa: BLE001 - a rendering bug must not lose the event: keep what we know
                xml = f"<AuditMessage><!-- not rendered: {type(exc).__name__} --></AuditMessage>"
                errors = [f"not rendered: {type(exc).__name__}: {exc}"]
            if errors:
                nodelog.error("audit.invalid_message", audit_event=event.kind, error="; ".join(errors)[:500])
            now = utcnow()
            row = AuditMessage(event=event.kind[:32], event_id=event.event_id.code, outcome=event.outcome,
                               at=event.at, xml=xml, state="pending", attempts=0, next_attempt_at=now,
                               schema_error="; ".join(errors) or None)
            s.add(row)
            s.flush()
            row_id = row.id
        if self.audit_wake is not None:
            self.audit_wake()
        return row_id

    def due_audit(self, limit: int = 200, now: datetime | None = None) -> list[PendingAudit]:
        """Pending messages in the order they were made, if the first is due (order is kept: one waits for all)."""
        now = now or utcnow()
        with self.read_session() as s:
            rows = s.execute(select(AuditMessage.id, AuditMessage.xml, AuditMessage.attempts,
                                    AuditMessage.next_attempt_at)
                             .where(AuditMessage.state == "pending").order_by(AuditMessage.id).limit(limit)).all()
        if not rows or rows[0].next_attempt_at > now:
            return []
        return [PendingAudit(r.id, r.xml, r.attempts) for r in rows]

    def next_audit_time(self) -> datetime | None:
        with self.read_session() as s:
            return s.scalar(select(func.min(AuditMessage.next_attempt_at)).where(AuditMessage.state == "pending"))

    def audit_sent(self, ids: Sequence[int], now: datetime | None = None) -> None:
        if not ids:
            return
        now = now or utcnow()
        with self.session() as s:
            s.execute(update(AuditMessage).where(AuditMessage.id.in_(list(ids)))
                      .values(state="sent", sent_at=now, attempts=AuditMessage.attempts + 1, last_error=None))

    def audit_not_sent(self, ids: Sequence[int], error: str, retry_in_seconds: float,
                       now: datetime | None = None) -> None:
        """The collector did not take these: they stay pending, retried after `retry_in_seconds`."""
        if not ids:
            return
        now = now or utcnow()
        with self.session() as s:
            s.execute(update(AuditMessage).where(AuditMessage.id.in_(list(ids)))
                      .values(attempts=AuditMessage.attempts + 1, last_error=error[:1000],
                              next_attempt_at=now + timedelta(seconds=retry_in_seconds)))

    def audit_messages(self, *, event: str | None = None, limit: int = 1000) -> list[AuditMessage]:
        """The latest audit rows (oldest first within the limit), optionally of one event kind."""
        with self.read_session() as s:
            query = select(AuditMessage).order_by(AuditMessage.id.desc()).limit(limit)
            if event is not None:
                query = query.where(AuditMessage.event == event)
            return list(reversed(list(s.scalars(query))))

    def audit_counts(self) -> dict[str, int]:
        """How many messages per state, and how many failed the schema check (key "invalid")."""
        with self.read_session() as s:
            counts = {state: n for state, n in s.execute(
                select(AuditMessage.state, func.count()).group_by(AuditMessage.state)).all()}
            counts["invalid"] = s.scalar(select(func.count()).where(AuditMessage.schema_error.is_not(None))) or 0
        return counts

    # -------------------------------------------------------- the previous run's configuration

    def swap_config_hash(self, new: str) -> str | None:
        """Store `new` as the effective configuration's hash; return the one the previous run stored."""
        with self.session() as s:
            row = s.get(Meta, CONFIG_HASH_KEY)
            old = row.value if row is not None else None
            if row is None:
                s.add(Meta(key=CONFIG_HASH_KEY, value=new))
            else:
                row.value = new
            return old
