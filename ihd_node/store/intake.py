"""Receiving: instances, their series and studies, and the associations that sent them."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import String, bindparam, case, func, insert, select, update
from sqlalchemy.orm import Session

from ihd_node.store.engine import DatabaseEngine
from ihd_node.store.schema import Instance, Series, Study, UTCDateTime, utcnow


@dataclass(frozen=True)
class Recorded:
    """What record_instance did. `new` is False for a resend of the same UID (same or changed content)."""

    new: bool
    changed_content: bool  # same SOP Instance UID, different sha256: the row now points at the new file
    reopened: bool  # the series had left "received" and was put back (late or changed instance)
    previous_state: str | None  # the series' state before, None if the series is new


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance, as record_instance stores it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str | Path
    size: int
    sha256: str
    transfer_syntax: str | None = None
    calling_aet: str | None = None
    peer_address: str | None = None
    association_id: str | None = None
    accession_number: str | None = None
    modality: str | None = None
    series_description: str | None = None
    received_at: datetime | None = None


class IntakeStore(DatabaseEngine):
    """Units of work of the receiver: record instances idempotently, note association ends."""

    def record_instance(self, **fields: Any) -> Recorded:
        """Store one received instance idempotently and keep study/series bookkeeping up to date.

        A new instance (or changed content) of a series that had already left "received" reopens it, so the
        assembler completes it again and the worker re-analyzes (revision + 1). Keywords: the fields of
        InstanceRecord.
        """
        result = self.record_instances([InstanceRecord(**fields)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def record_instances(self, records: Sequence[InstanceRecord]) -> list[Recorded | Exception]:
        """Several instances in one transaction (group commit, see InstanceBatcher); one result per record.

        If the transaction fails, each record is tried again in its own, so one bad row cannot fail the others;
        the result is then the exception of the records that still fail."""
        try:
            plain = self._record_plain(records)
            if plain is not None:
                return plain
            with self.session() as s:
                return [self._record(s, r) for r in records]
        except Exception as exc:
            if len(records) == 1:
                return [exc]
        out: list[Recorded | Exception] = []
        for r in records:
            try:
                with self.session() as s:
                    out.append(self._record(s, r))
            except Exception as exc:
                out.append(exc)
        return out

    def _record_plain(self, records: Sequence[InstanceRecord]) -> list[Recorded] | None:
        """The batch in one transaction of plain statements without an ORM session (its set-up and commit
        cost as much as the statements), when every record takes the short path; otherwise nothing is
        written and None is returned (record_instances then uses the session)."""
        with self._write_lock, self.engine.connect() as conn, conn.begin() as tx:
            out: list[Recorded] = []
            for r in records:
                rec = self._record_short(conn, r, r.received_at or utcnow())
                if rec is None:
                    tx.rollback()
                    return None
                out.append(rec)
            return out

    def _record(self, s: Session, r: InstanceRecord) -> Recorded:
        """The usual case — a new instance of a known series still in "received" — in four plain statements;
        everything else (new study or series, resend, changed content, moved or late instance) in
        _record_full. Both in session `s`, so they share its transaction."""
        now = r.received_at or utcnow()
        rec = self._record_short(s.connection(), r, now)
        if rec is None:
            s.expire_all()  # ORM objects loaded earlier in this batch may be older than the plain updates
            rec = self._record_full(s, r, now)
            s.flush()  # the plain statements of the next record do not autoflush
        return rec

    @staticmethod
    def _record_short(conn: Any, r: InstanceRecord, now: datetime) -> Recorded | None:
        """The short path's four statements, or None (nothing written) when the record needs _record_full."""
        q = _fast_record_statements()
        row = conn.execute(q.series_row, {"p_series_uid": r.series_instance_uid}).first()
        if row is None or row.state != "received" or conn.execute(
                q.instance_id, {"p_sop_uid": r.sop_instance_uid}).first() is not None:
            return None
        conn.execute(q.insert_instance, {
            "sop_instance_uid": r.sop_instance_uid, "series_id": row.id, "sop_class_uid": r.sop_class_uid,
            "path": str(r.path), "size": r.size, "sha256": r.sha256, "transfer_syntax": r.transfer_syntax,
            "calling_aet": r.calling_aet, "peer_address": r.peer_address, "received_at": now})
        conn.execute(q.update_series, {
            "p_id": row.id, "p_last": max(row.last_received, now), "p_aet": r.calling_aet or None,
            "p_association": r.association_id, "p_now": now, "p_modality": r.modality or None,
            "p_description": (r.series_description or "")[:64] or None})
        conn.execute(q.update_study if r.accession_number else q.update_study_keep_accession, {
            "p_id": row.study_id, "p_now": now, "p_accession": (r.accession_number or "")[:16]})
        return Recorded(new=True, changed_content=False, reopened=False, previous_state="received")

    @staticmethod
    def _record_full(s: Session, r: InstanceRecord, now: datetime) -> Recorded:
        """record_instance's whole logic with the ORM (first instance of a series, resends, late instances)."""
        (study_instance_uid, series_instance_uid, sop_instance_uid, sop_class_uid, path, size, sha256,
         transfer_syntax, calling_aet, peer_address, association_id, accession_number, modality,
         series_description) = (r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid, r.sop_class_uid,
                                r.path, r.size, r.sha256, r.transfer_syntax, r.calling_aet, r.peer_address,
                                r.association_id, r.accession_number, r.modality, r.series_description)
        study = s.scalars(
            select(Study).where(Study.study_instance_uid == study_instance_uid)
        ).one_or_none()
        if study is None:
            study = Study(study_instance_uid=study_instance_uid, first_received=now, last_received=now)
            s.add(study)
        study.last_received = max(study.last_received, now)
        if accession_number:
            study.accession_number = accession_number[:16]

        series = s.scalars(
            select(Series).where(Series.series_instance_uid == series_instance_uid)
        ).one_or_none()
        previous_state = None if series is None else series.state
        if series is None:
            series = Series(
                series_instance_uid=series_instance_uid,
                study=study,
                state="received",
                n_instances=0,
                revision=0,
                first_received=now,
                last_received=now,
                updated=now,
            )
            s.add(series)
        series.modality = modality or series.modality
        series.series_description = (series_description or series.series_description or "")[:64] or None
        s.flush()  # ids for the foreign keys below

        inst = s.scalars(
            select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
        ).one_or_none()
        new = inst is None
        changed = False
        if inst is None:
            inst = Instance(sop_instance_uid=sop_instance_uid, series_id=series.id)
            s.add(inst)
            series.n_instances += 1
        else:
            changed = inst.sha256 != sha256
            if inst.series_id != series.id:
                # Same SOP UID now claimed by another series: move it, keep both counts honest.
                old = s.get(Series, inst.series_id)
                if old is not None:
                    old.n_instances -= 1
                    _reopen(old, now, "an instance moved to another series")
                series.n_instances += 1
                changed = True
        inst.series_id = series.id
        inst.sop_class_uid, inst.path, inst.size, inst.sha256 = sop_class_uid, str(path), size, sha256
        inst.transfer_syntax, inst.calling_aet, inst.peer_address = (
            transfer_syntax,
            calling_aet,
            peer_address,
        )
        inst.received_at = now

        # A resend of identical content changes nothing about completion; anything else restarts it.
        reopened = False
        if new or changed:
            series.last_received = max(series.last_received, now)
            series.calling_aet = calling_aet or series.calling_aet
            series.last_association = association_id
            series.association_released = None
            # A retracted result is not analysed again by a late instance: only on request (console).
            if previous_state not in (None, "received", "retracted"):
                why = "changed instance" if changed else "late instance"
                reopened = _reopen(series, now, f"{why} after state {previous_state}")
        series.updated = now
        return Recorded(
            new=new, changed_content=changed, reopened=reopened, previous_state=previous_state
        )

    def association_released(self, association_id: str, when: datetime | None = None) -> int:
        """Note that an association ended; its series may now complete by the quiet rule. Returns how many."""
        when = when or utcnow()
        with self.session() as s:
            result = s.execute(
                update(Series)
                .where(Series.last_association == association_id, Series.association_released.is_(None))
                .values(association_released=when, updated=when)
            )
            return int(result.rowcount or 0)


@dataclass(frozen=True)
class _FastRecordStatements:
    series_row: Any
    instance_id: Any
    insert_instance: Any
    update_series: Any
    update_study: Any
    update_study_keep_accession: Any


@functools.cache
def _fast_record_statements() -> _FastRecordStatements:
    """The usual-case statements of Database._record, built once with bound parameters: building them per
    instance (SQLAlchemy coercions and cache keys) cost ~1 ms of the ~1.7 ms the row took."""
    now = bindparam("p_now", type_=UTCDateTime())
    study_last = case((Study.last_received < now, now), else_=Study.last_received)
    return _FastRecordStatements(
        series_row=select(Series.id, Series.study_id, Series.state, Series.last_received).where(
            Series.series_instance_uid == bindparam("p_series_uid")),
        instance_id=select(Instance.id).where(Instance.sop_instance_uid == bindparam("p_sop_uid")),
        insert_instance=insert(Instance),
        update_series=update(Series).where(Series.id == bindparam("p_id")).values(
            n_instances=Series.n_instances + 1, last_received=bindparam("p_last", type_=UTCDateTime()),
            calling_aet=func.coalesce(bindparam("p_aet", type_=String()), Series.calling_aet),
            last_association=bindparam("p_association", type_=String()), association_released=None,
            updated=now, modality=func.coalesce(bindparam("p_modality", type_=String()), Series.modality),
            series_description=func.coalesce(bindparam("p_description", type_=String()),
                                             Series.series_description)),
        update_study=update(Study).where(Study.id == bindparam("p_id")).values(
            last_received=study_last, accession_number=bindparam("p_accession", type_=String())),
        update_study_keep_accession=update(Study).where(Study.id == bindparam("p_id")).values(
            last_received=study_last))


class InstanceBatcher:
    """Group commit for received instances: each caller returns once its row is committed, and rows that
    arrive while a transaction is running are committed together in the next one (at most max_batch).

    No timer and no extra thread: the first waiting caller commits for everyone queued (leader), so one
    sender alone still pays one transaction per instance and no added wait, and 8 concurrent senders
    share transactions."""

    def __init__(self, db: IntakeStore, max_batch: int = 64) -> None:
        self.db, self.max_batch = db, max_batch
        self._pending: list[tuple[InstanceRecord, Future[Recorded]]] = []
        self._pending_lock = threading.Lock()
        self._leader = threading.Lock()
        self.transactions = 0  # how many record_instances calls (for tests and benchmarks)

    def record(self, record: InstanceRecord) -> Recorded:
        """Commit `record` (perhaps with others); raises what recording it raised."""
        future: Future[Recorded] = Future()
        with self._pending_lock:
            self._pending.append((record, future))
        while not future.done():
            with self._leader:
                if future.done():  # an earlier leader committed it
                    break
                with self._pending_lock:
                    batch = self._pending[: self.max_batch]
                    del self._pending[: self.max_batch]
                self.transactions += 1
                try:
                    results: list[Recorded | Exception] = self.db.record_instances([r for r, _ in batch])
                except BaseException as exc:  # noqa: BLE001 (handed to every waiter, then raised)
                    results = [exc] * len(batch)  # type: ignore[list-item]
                for (_, fut), result in zip(batch, results, strict=True):
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        return future.result()


def _reopen(series: Series, now: datetime, why: str) -> bool:
    if series.state == "received":
        return False
    series.state = "received"
    series.reason = why
    series.completed = None
    series.completion_rule = None
    series.updated = now
    return True
