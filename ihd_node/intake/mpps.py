"""Modality Performed Procedure Step SCP (N-CREATE / N-SET): the scanner's own word on what it made.

A modality (or a PACS forwarding MPPS) creates the step IN PROGRESS and sets it COMPLETED with the list of
series and instances it produced (PerformedSeriesSequence > ReferencedImageSequence), or DISCONTINUED.
The node stores each step and its instance list; the completion checks (completion.py) then wait for
every listed instance of a series the node receives (never for series it is not sent), and stop waiting
when the step is DISCONTINUED. Steps from calling AE titles not in `series.trust_mpps` are answered and
stored but not used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ihd_node import nodelog
from ihd_node.intake.spool import valid_uid
from ihd_node.store import Database

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
STATUSES = ("IN PROGRESS", "COMPLETED", "DISCONTINUED")
FINAL = ("COMPLETED", "DISCONTINUED")

SUCCESS = 0x0000
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
MISSING_ATTRIBUTE = 0x0120


def listed_instances(ds: Dataset) -> list[tuple[str, str, str | None]] | None:
    """(series UID, SOP Instance UID, SOP Class UID) listed in PerformedSeriesSequence; None when absent."""
    if "PerformedSeriesSequence" not in ds:
        return None
    out = []
    for series in ds.PerformedSeriesSequence or []:
        series_uid = str(series.get("SeriesInstanceUID", "") or "")
        if not valid_uid(series_uid):
            continue
        for key in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for ref in series.get(key) or []:
                sop = str(ref.get("ReferencedSOPInstanceUID", "") or "")
                if valid_uid(sop):
                    out.append((series_uid, sop, str(ref.get("ReferencedSOPClassUID", "") or "") or None))
    return out


def _study_uid(ds: Dataset) -> str | None:
    for item in ds.get("ScheduledStepAttributesSequence") or []:
        uid = str(item.get("StudyInstanceUID", "") or "")
        if valid_uid(uid):
            return uid
    return None


class MppsScp:
    """Handlers for the receiver's N-CREATE and N-SET events (pynetdicom handler return values)."""

    def __init__(self, db: Database, trusted: Callable[[str | None], bool]) -> None:
        self.db = db
        self.trusted = trusted

    def _event(self, message: str, calling_aet: str | None, level: str = "INFO",
               study_uid: str | None = None) -> None:
        try:
            self.db.log_event("mpps", message, level=level, calling_aet=(calling_aet or "")[:16] or None,
                              study_instance_uid=study_uid)
        except Exception as exc:  # the database is down: the journal keeps the line
            nodelog.error("mpps.unrecorded", message=message, error=f"{type(exc).__name__}: {exc}")

    def on_create(self, event: Any, calling_aet: str | None) -> tuple[int, Dataset | None]:
        ds = event.attribute_list
        uid = str(event.request.AffectedSOPInstanceUID or "") or generate_uid()
        if not valid_uid(uid):
            return INVALID_ATTRIBUTE_VALUE, None
        status = str(ds.get("PerformedProcedureStepStatus", "") or "")
        if status != "IN PROGRESS":  # PS3.4 F.7.2.1: a step is created in progress
            self._event(f"N-CREATE {uid} refused: status {status or 'missing'!r}, not 'IN PROGRESS'",
                        calling_aet, "WARNING")
            return (MISSING_ATTRIBUTE if not status else INVALID_ATTRIBUTE_VALUE), None
        if self.db.get_mpps(uid) is not None:
            return DUPLICATE_SOP_INSTANCE, None
        trusted = self.trusted(calling_aet)
        instances = listed_instances(ds)
        study = _study_uid(ds)
        self.db.save_mpps(uid, status=status, calling_aet=calling_aet, trusted=trusted,
                          study_instance_uid=study, instances=instances)
        self._event(f"N-CREATE {uid} IN PROGRESS{'' if trusted else ' (not trusted: series.trust_mpps)'}",
                    calling_aet, study_uid=study)
        reply = Dataset()
        reply.PerformedProcedureStepStatus = status
        if not event.request.AffectedSOPInstanceUID:
            reply.AffectedSOPInstanceUID = uid
        return SUCCESS, reply

    def on_set(self, event: Any, calling_aet: str | None) -> tuple[int, Dataset | None]:
        ds = event.modification_list
        uid = str(event.request.RequestedSOPInstanceUID or "")
        row = self.db.get_mpps(uid) if valid_uid(uid) else None
        if row is None:
            return NO_SUCH_OBJECT_INSTANCE, None
        if row.status in FINAL:  # PS3.4 F.7.2.2: a finished step may no longer be updated
            self._event(f"N-SET {uid} refused: the step is already {row.status}", calling_aet, "WARNING")
            return PROCESSING_FAILURE, None
        status = str(ds.get("PerformedProcedureStepStatus", "") or row.status)
        if status not in STATUSES:
            return INVALID_ATTRIBUTE_VALUE, None
        instances = listed_instances(ds)
        trusted = self.trusted(calling_aet)
        self.db.save_mpps(uid, status=status, calling_aet=calling_aet, trusted=trusted,
                          study_instance_uid=_study_uid(ds), instances=instances)
        listed = self.db.mpps_instance_count(uid)
        what = {"COMPLETED": f"COMPLETED listing {listed} instance(s): the node waits for those of the series "
                             "it receives" if trusted else f"COMPLETED listing {listed} instance(s), not "
                             "trusted (series.trust_mpps): not used",
                "DISCONTINUED": "DISCONTINUED: no series waits for this step"}.get(status, status)
        self._event(f"N-SET {uid} {what}", calling_aet, study_uid=row.study_instance_uid)
        return SUCCESS, ds
