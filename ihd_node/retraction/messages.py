"""The message files of one result for the destinations that are not C-STORE, written into the result folder
(results_dir/<series>/r<revision>/) before the outbox rows that send them are committed.

- hl7: `ORU_<status>_<destination>.hl7`, an ORU^R01 (ER7, segments ended by CR); its outbox row is keyed by
  (destination, control ID), the control ID being `message_id(series, revision, status)`.
- fhir: `FHIR_<status>_<destination>.json`, a transaction Bundle; keyed by (destination, the same message id).
- dicomweb: no file of its own: its rows are the SR (and captures unless send_captures is false), keyed by
  SOP Instance UID as for a DICOM destination.

The message id is derived from the series, the revision and the status: a crash before the commit writes the
same id again, a resend after a crash sends the same id (the receiver sees a duplicate, not a second
result), and a revision or a retraction gets an id of its own. `clinical.json` keeps the ClinicalResult the
messages were built from, so a retraction can build the withdrawn ORU and FHIR report without the model.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from ihd_node.config import Config
from ihd_node.config.outbound import MESSAGE_KINDS
from ihd_node.store import FHIR_BUNDLE, HL7_ORU, ResultObject

CLINICAL_FILE = "clinical.json"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # the Grad-CAM captures' class


def message_id(series_instance_uid: str, revision: int, status: str) -> str:
    """20 characters (the longest MSH-10 Message Control ID HL7 v2.5.1 allows), stable for one series,
    report revision (0 = first) and status."""
    digest = hashlib.sha256(f"{series_instance_uid}|{revision}|{status}".encode()).hexdigest()
    return f"IHD{digest[:17].upper()}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename: after a crash the file is there whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def status_of(revision: int) -> str:
    """preliminary (HL7 P, FHIR preliminary) for a first result, revised (C, amended) for a revision."""
    return "preliminary" if revision == 0 else "revised"


def message_files(config: Config, folder: Path, result: Any, *, status: str, now: dt.datetime,
                  reason: str = "", problems: list[str] | None = None) -> dict[str, list[ResultObject]]:
    """Build and write one message per hl7 and fhir destination; {destination: [its message file]}. A
    message the builder refuses (no Patient ID: the RIS could not match it) is left out and said in
    `problems`: the DICOM results still go out."""
    control_id = message_id(result.series_instance_uid, result.revision, status)
    out: dict[str, list[ResultObject]] = {}
    for dest in config.destinations:
        if dest.kind not in MESSAGE_KINDS:
            continue
        try:
            out[dest.name] = [_message_file(dest, folder, result, status=status, now=now, reason=reason,
                                            control_id=control_id)]
        except ValueError as exc:
            if problems is None:
                raise
            problems.append(f"no {dest.kind} message for {dest.name}: {exc}")
    return out


def _message_file(dest: Any, folder: Path, result: Any, *, status: str, now: dt.datetime, reason: str,
                  control_id: str) -> ResultObject:
    if dest.kind == "hl7":
        from ihd_node.report.hl7 import Hl7Addressing, build_oru

        addressing = Hl7Addressing(
            sending_application=dest.sending_application, sending_facility=dest.sending_facility,
            receiving_application=dest.receiving_application, receiving_facility=dest.receiving_facility,
            include_patient_data=dest.include_patient_data, placer_order_number=dest.placer_order_number,
            filler_order_number=dest.filler_order_number)
        text = build_oru(result, addressing, status=status, control_id=control_id, now=now, reason=reason)
        path = folder / f"ORU_{status}_{dest.name}.hl7"
        write_atomic(path, text.encode("utf-8"))
        return ResultObject(control_id, HL7_ORU, path)
    from ihd_node.report.fhir import FhirSettings, build_bundle, bundle_bytes

    settings = FhirSettings(patient_identifier_system=dest.patient_identifier_system,
                            include_patient_data=dest.include_patient_data)
    bundle = build_bundle(result, settings, status=status, now=now, reason=reason)
    path = folder / f"FHIR_{status}_{dest.name}.json"
    write_atomic(path, bundle_bytes(bundle))
    return ResultObject(control_id, FHIR_BUNDLE, path)


def dicomweb_objects(config: Config, objects: Sequence[ResultObject]) -> dict[str, list[ResultObject]]:
    """The DICOM objects each dicomweb destination gets: all, or all but the captures (send_captures: false)."""
    out: dict[str, list[ResultObject]] = {}
    for dest in config.destinations:
        if dest.kind == "dicomweb":
            out[dest.name] = [o for o in objects if dest.send_captures or o.sop_class_uid != SECONDARY_CAPTURE]
    return out


def result_messages(config: Config, folder: Path, sr: Dataset, prediction: Any, volume: Any,
                    slice_groups: list[list[int]] | None, objects: Sequence[ResultObject], *, revision: int,
                    now: dt.datetime, problems: list[str]) -> dict[str, list[ResultObject]]:
    """At analysis time: clinical.json, the messages of every hl7/fhir destination and the object lists of
    the dicomweb ones ({destination: rows}); the DICOM destinations get `objects` as before."""
    out = dicomweb_objects(config, objects)
    if not any(d.kind in MESSAGE_KINDS for d in config.destinations):
        return out  # no clinical view needed (a destination added later gets the next results)
    from ihd_node.report.clinical import clinical_result
    from ihd_node.report.source import volume_lossy
    from ihd_node.report.sr import summary_text

    summary = summary_text(volume, prediction, slice_groups, volume_lossy(volume))
    result = clinical_result(sr, prediction, volume, slice_groups, summary, revision=revision)
    save_result(folder, result)
    out.update(message_files(config, folder, result, status=status_of(revision), now=now, problems=problems))
    return out


# ------------------------------------------------------------------ the ClinicalResult kept for a retraction

def save_result(folder: Path, result: Any) -> None:
    from ihd_node.report.clinical import to_json

    write_atomic(folder / CLINICAL_FILE, to_json(result).encode("utf-8"))


def load_result(folder: Path) -> Any | None:
    """The ClinicalResult saved with the analysis; without one (a result analysed before HL7/FHIR
    destinations were configured) the one rebuilt from the result's SR file; None when neither is there."""
    from ihd_node.report.clinical import clinical_result_from_sr, from_json

    try:
        return from_json((folder / CLINICAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError):
        pass
    for path in sorted(folder.glob("SR_*.dcm")):
        try:
            return clinical_result_from_sr(pydicom.dcmread(path))
        except (OSError, ValueError, AttributeError):
            continue
    return None
