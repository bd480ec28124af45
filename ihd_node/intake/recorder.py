"""The receiver's Recorder over the database: instances, association ends and audit events.

An association that ends without an A-RELEASE (A-ABORT, a dropped connection, or one open when the node
stopped) says nothing about its series being whole: such a series does not complete by the quiet rule; it
waits, with the reason recorded, for the completion evidence or series.max_wait_seconds.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from ihd_node import nodelog
from ihd_node.audit import StudyObject, events
from ihd_node.intake.receiver import Peer, ReceivedInstance
from ihd_node.store import Database, InstanceBatcher, InstanceRecord
from ihd_node.store.arrivals import IgnoredArrival, note_open_series, record_ignored

# The reason a received series shows while it waits after its association ended without a release.
ABORTED_WAITING = ("waiting for the rest of the series: its association {how} without a release, so instances "
                   "may be missing; it completes at series.max_wait_seconds after the last instance (sooner "
                   "only by a trusted MPPS listing all of them), INCOMPLETE SERIES while the checks say incomplete")


def abort_open_associations(db: Database) -> int:
    """At start-up: an association that was open when the node stopped ended without a release (the node
    died or stopped with it), so its series wait as after an A-ABORT. Returns how many series."""
    return note_open_series(db, ABORTED_WAITING.format(how="was open when the node stopped, so it ended"))


@dataclass
class _StudyTally:
    """What one association brought of one study, for its 110104 audit message at the association's end."""

    classes: Counter[str] = field(default_factory=Counter)
    accession: str = ""
    patient_id: str = ""


class DatabaseRecorder:
    """The Recorder over ihd_node.store.database: instances, association ends, and audit events."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.batcher = InstanceBatcher(db)  # concurrent associations share transactions
        self._lock = threading.Lock()
        self._received: dict[str, dict[str, _StudyTally]] = {}  # association id -> study UID -> tally

    def association_refused(self, peer: Peer, reason: str) -> None:
        self.db.audit(events.association_refused(peer.calling_aet, peer.address, reason))

    def _tally(self, inst: ReceivedInstance) -> None:
        with self._lock:
            tally = self._received.setdefault(inst.peer.key, {}).setdefault(inst.study_instance_uid, _StudyTally())
            tally.classes[inst.sop_class_uid] += 1
            tally.accession = tally.accession or inst.accession_number
            tally.patient_id = tally.patient_id or inst.patient_id

    def _audit_received(self, peer: Peer, how: str) -> None:
        """One 110104 DICOM Instances Transferred message per study the association brought."""
        with self._lock:
            studies = self._received.pop(peer.key, {})
        note = None if how == "released" else f"association {how} without a release; instances may be missing"
        for uid, tally in studies.items():
            study = StudyObject(uid, tuple(sorted(tally.classes.items())), tally.accession or None,
                                tally.patient_id or None)
            try:
                self.db.audit(events.instances_received(peer.calling_aet, peer.address, [study], outcome_text=note))
            except Exception as exc:  # noqa: BLE001 - the instances are recorded; say in the journal what is missing
                nodelog.error("audit.unrecorded", what="instances received", study=uid,
                              error=f"{type(exc).__name__}: {exc}")

    def event(self, kind: str, message: str, *, level: str = "INFO", peer: Peer | None = None,
              series_uid: str | None = None, study_uid: str | None = None) -> None:
        self.db.log_event(kind, message, level=level, series_instance_uid=series_uid,
                          study_instance_uid=study_uid, calling_aet=(peer.calling_aet[:16] or None) if peer else None,
                          peer_address=f"{peer.address}:{peer.port}" if peer else None)

    def association_ended(self, peer: Peer, how: str) -> None:
        self._audit_received(peer, how)
        if how == "released":
            self.db.association_released(peer.key)
        else:  # an A-ABORT or a dropped connection says nothing about the series being whole
            note_open_series(self.db, ABORTED_WAITING.format(how=how), association_id=peer.key)

    def instance_received(self, inst: ReceivedInstance) -> None:
        self._record(inst)
        self._tally(inst)  # only once recorded: a refused store (0xA700) is sent again and counted then

    def _record(self, inst: ReceivedInstance) -> None:
        if inst.ignored_reason is not None:
            if record_ignored(self.db, IgnoredArrival(
                    study_instance_uid=inst.study_instance_uid, series_instance_uid=inst.series_instance_uid,
                    reason=inst.ignored_reason, accession_number=inst.accession_number, modality=inst.modality,
                    series_description=inst.series_description, calling_aet=inst.peer.calling_aet)):
                self.event("ignored", inst.ignored_reason, peer=inst.peer,
                           series_uid=inst.series_instance_uid, study_uid=inst.study_instance_uid)
            return
        rec = self.batcher.record(InstanceRecord(
            study_instance_uid=inst.study_instance_uid, series_instance_uid=inst.series_instance_uid,
            sop_instance_uid=inst.sop_instance_uid, sop_class_uid=inst.sop_class_uid, path=str(inst.path),
            size=inst.size, sha256=inst.sha256, transfer_syntax=inst.transfer_syntax_uid,
            calling_aet=inst.peer.calling_aet[:16], peer_address=inst.peer.address,
            association_id=inst.peer.key,
            accession_number=inst.accession_number or None, modality=inst.modality or None,
            series_description=inst.series_description or None))
        where = {"peer": inst.peer, "series_uid": inst.series_instance_uid,
                 "study_uid": inst.study_instance_uid}
        if rec.changed_content:
            self.event("received", f"instance {inst.sop_instance_uid} sent again with other content; the "
                       "newest is analysed, both files are kept", level="WARNING", **where)
        if rec.previous_state is None:
            self.event("received", "first instance of a new series", **where)
        elif rec.reopened:
            self.event("received", f"late instance after state {rec.previous_state}: the series will be "
                       "analysed again (revision + 1)", **where)
