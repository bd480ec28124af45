"""Taking a result back: `retract()` (called by `ihd-node retract` and the console's retract action).

For the series' latest analysis it writes the notices, then books the retraction and queues the notices
in one transaction (ihd_node.store.retraction):
- every dicom and dicomweb destination: an IHE IOCM rejection note, a Key Object Selection titled
  "Rejected for Patient Safety Reasons" (DCM 113037) listing every DICOM object of the result (the SR and
  the captures; all of them, not only those booked as sent: an object sent just before a crash is in the
  PACS without the node knowing, and rejecting an object a PACS does not hold is harmless);
- every hl7 destination: the ORU again with result status W (wrong: withdrawn) and the reason;
- every fhir destination: the DiagnosticReport (and its Observations) as entered-in-error.
The series becomes "retracted" (a late instance does not analyse it again; the console's re-analyse does),
pending deliveries of the result are cancelled, and the event log says who retracted it and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydicom

from ihd_node.audit import StudyObject, events
from ihd_node.config import Config
from ihd_node.errors import UserError
from ihd_node.retraction.messages import load_result, message_files, write_atomic
from ihd_node.store import Database, NotRetractable, ResultObject, utcnow
from ihd_node.uids import SERIES_OFFSETS

KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


class RetractionRefused(UserError):
    """Nothing to retract: an unknown or never analysed series, one retracted already, or no reason."""


@dataclass(frozen=True)
class Retraction:
    series_instance_uid: str
    revision: int  # the report revision taken back (0 = the first result)
    notices: dict[str, str]  # destination -> what it gets (rejection note, withdrawn ORU, ...)
    skipped: tuple[str, ...]  # destinations that get no notice, with why

    def summary(self) -> str:
        sent = ", ".join(f"{d}: {what}" for d, what in self.notices.items()) or "no destinations"
        extra = f"; not notified: {', '.join(self.skipped)}" if self.skipped else ""
        return f"result revision {self.revision} of series {self.series_instance_uid} retracted; queued {sent}{extra}"


def result_objects(folder: Path) -> list[pydicom.Dataset]:
    """Headers of the DICOM objects of one result (SR, captures, key images; rejection notes excluded)."""
    headers = []
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        title = ds.get("ConceptNameCodeSequence")
        rejection = str(ds.SOPClassUID) == KOS_CLASS and title and str(title[0].get("CodeValue")) == "113037"
        if not rejection:  # key images (a KOS too) are part of the result; a rejection note is not
            headers.append(ds)
    return headers


def rejection_note_file(folder: Path, reason: str) -> ResultObject | None:
    """Write the IOCM rejection note of the result in `folder`; None when the folder holds no objects."""
    from ihd_node.report.kos import rejection_note

    objects = result_objects(folder)
    srs = [ds for ds in objects if ds.get("Modality") == "SR"]
    if not objects:
        return None
    source = srs[0] if srs else objects[0]
    try:
        # the SR's series number is its result series' base (offset 0): the note takes the rejection offset
        series_number = int(source.get("SeriesNumber")) + SERIES_OFFSETS["rejection"] - SERIES_OFFSETS["sr"]
    except (TypeError, ValueError):
        series_number = 99_999_999
    kos = rejection_note(source, objects, reason=reason, series_number=series_number)
    path = folder / f"KOS_{kos.SOPInstanceUID}.dcm"
    buffer = pydicom.filebase.DicomBytesIO()
    pydicom.dcmwrite(buffer, kos, enforce_file_format=True)
    write_atomic(path, buffer.getvalue())
    return ResultObject(str(kos.SOPInstanceUID), KOS_CLASS, path)


def retract(config: Config, db: Database, series_instance_uid: str, *, reason: str, who: str,
            results_dir: Path, now: datetime | None = None) -> Retraction:
    """Retract the series' latest result (see the module doc); RetractionRefused says why not."""
    reason = " ".join(reason.split())
    if not reason:
        raise RetractionRefused("give the reason (--reason TEXT): it goes into the rejection note, the ORU "
                                "and the FHIR report, and the event log")
    now = now or utcnow()
    try:
        analysis = db.retraction_target(series_instance_uid)
    except NotRetractable as exc:
        raise RetractionRefused(str(exc)) from None
    revision = analysis.revision - 1  # analyses count from 1, report revisions from 0
    folder = Path(results_dir) / series_instance_uid / f"r{revision}"
    notices: dict[str, list[ResultObject]] = {}
    said: dict[str, str] = {}
    skipped: list[str] = []
    dicom_like = [d for d in config.destinations if d.kind in ("dicom", "dicomweb")]
    if dicom_like:
        note = rejection_note_file(folder, reason)
        for dest in dicom_like:
            if note is None:
                skipped.append(f"{dest.name} (the result files are gone from {folder})")
                continue
            notices[dest.name] = [note]
            said[dest.name] = "IOCM rejection note (KOS)"
    if any(d.kind in ("hl7", "fhir") for d in config.destinations):
        result = load_result(folder)
        if result is None:
            skipped += [f"{d.name} (neither clinical.json nor the SR is left in {folder})"
                        for d in config.destinations if d.kind in ("hl7", "fhir")]
        else:
            refused: list[str] = []
            for dest, files in message_files(config, folder, result, status="retracted", now=now,
                                             reason=reason, problems=refused).items():
                notices[dest] = files
                said[dest] = "withdrawn ORU (W)" if config.destination(dest).kind == "hl7" \
                    else "DiagnosticReport entered-in-error"
            skipped += refused
    try:
        db.retract_analysis(series_instance_uid, reason=reason, who=who, notices=notices, now=now)
    except NotRetractable as exc:  # retracted by someone else since the check above
        raise RetractionRefused(str(exc)) from None
    done = Retraction(series_instance_uid, revision, said, tuple(skipped))
    series = analysis.series
    db.log_event("retraction", f"retracted by {who}: {reason}; {done.summary()}", level="WARNING",
                 series_instance_uid=series_instance_uid, study_instance_uid=series.study_instance_uid)
    # IHE ATNA: the person who asked ("alice (console)" -> UserID alice) is the requestor
    db.audit(events.retraction(who.split(" (", 1)[0], StudyObject(series.study_instance_uid), series_instance_uid,
                               f"retracted by {who}: {reason}"))
    return done
