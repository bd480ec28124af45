"""The result as a FHIR R4 transaction Bundle for the EHR: a DiagnosticReport and one Observation per class.

Every entry is a conditional update (PUT `Type?identifier=system|value`) on an identifier that stays the
same for the analysed series across revisions and a retraction (a name-based UUID of its Series Instance
UID), so a re-send finds and updates the same resources, never duplicates them, and a revision (amended)
or retraction (entered-in-error) replaces what the EHR holds. fullUrls are the same UUIDs: building the
bundle again from the same result gives the same bytes (bundle_bytes). Patient, ImagingStudy and
ServiceRequest are referenced logically by identifier (the EHR has them; none is created here).
The README lists the resources element by element and where this departs from HL7's DICOM SR to FHIR
mapping guide.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Literal

import highdicom as hd

from ihd_node.classes import CLASSES, FINDING_NAMES, NOT_FOR_DIAGNOSTIC_USE
from ihd_node.report.clinical import ClinicalResult, slices_text
from ihd_node.report.codes import ABSENT, FINDING_CODES, FINDING_SITE, PRESENT, PRIVATE_SCHEME

Status = Literal["preliminary", "revised", "retracted"]
REPORT_STATUS = {"preliminary": "preliminary", "revised": "amended", "retracted": "entered-in-error"}
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "LN": "http://loinc.org",
    "UMLS": "http://www.nlm.nih.gov/research/umls",
    # The private ICH subtype codes have no registered code system; this URN names them (README).
    PRIVATE_SCHEME: "urn:ihd-node:codes",
}
URI_IDENTIFIER = "urn:ietf:rfc:3986"  # an identifier whose value is itself a URI (urn:uuid:...)
DICOM_UID = "urn:dicom:uid"  # value urn:oid:<UID>, as FHIR ImagingStudy identifies DICOM UIDs
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
# The key of a result: UUIDv5 in this namespace of "<series UID>" (report) and "<series UID>/<class>".
RESULT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "ihd-node ICH result")
REPORT_CODE = [{"system": SYSTEMS["LN"], "code": "30799-1", "display": "CT Head WO contrast"},
               {"system": SYSTEMS["SCT"], "code": "303653007", "display": "Computed tomography of head"}]
CATEGORY = [{"coding": [{"system": SYSTEMS["LN"], "code": "LP29684-5", "display": "Radiology"},
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                         "display": "Radiology"}]}]
OBSERVATION_CATEGORY = [
    {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging",
                 "display": "Imaging"}]},
    {"coding": [{"system": SYSTEMS["DCM"], "code": "125007", "display": "Measurement Group"}]},
]
PROBABILITY = {"coding": [{"system": SYSTEMS["DCM"], "code": "122157", "display": "Probability"}]}
SOURCE_IMAGES = {"coding": [{"system": SYSTEMS["DCM"], "code": "121112", "display": "Source of Measurement"}]}


@dataclass(frozen=True)
class FhirSettings:
    """How the EHR identifies patients, and whether the name goes along.

    patient_identifier_system: the system of the patient identifier (the EHR's MRN system URI). Empty:
    taken from the study's Issuer of Patient ID qualifiers (an ISO Universal Entity ID as urn:oid:<OID>, a
    URI as is); without those the identifier has no system, only type MR and the issuer's name as assigner.
    include_patient_data: the patient's name as the subject's display text (never the birth date).
    """

    patient_identifier_system: str = ""
    include_patient_data: bool = True


def coding(concept: hd.sr.CodedConcept) -> dict:
    return {"system": SYSTEMS.get(concept.scheme_designator, f"urn:dicom:scheme:{concept.scheme_designator}"),
            "code": concept.value, "display": concept.meaning}


def _instant(moment: dt.datetime) -> str:
    """An instant/dateTime with seconds and offset (naive = the node's local time)."""
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.replace(microsecond=0).isoformat()


def result_uuid(result: ClinicalResult, cls: str | None = None) -> str:
    """urn:uuid of the report (cls None) or of one class's Observation: the same for every revision."""
    name = result.series_instance_uid if cls is None else f"{result.series_instance_uid}/{cls}"
    return f"urn:uuid:{uuid.uuid5(RESULT_NAMESPACE, name)}"


def _uid(value: str, text: str) -> dict:
    return {"type": {"text": text}, "system": DICOM_UID, "value": f"urn:oid:{value}"}


def patient_system(result: ClinicalResult, settings: FhirSettings) -> str:
    if settings.patient_identifier_system:
        return settings.patient_identifier_system
    universal, kind = result.issuer_universal_id, result.issuer_universal_id_type.upper()
    if universal and kind == "ISO":
        return f"urn:oid:{universal}"
    if universal and kind in ("URI", "URL"):
        return universal
    return ""


def _display_name(dicom_pn: str) -> str:
    """'Yamada, Tarou (山田 太郎)': the alphabetic group, the ideographic in brackets."""
    groups = [[p.strip() for p in g.split("^")] for g in str(dicom_pn or "").split("=")]
    texts = []
    for parts in groups[:2]:
        family, given = (parts + ["", ""])[:2]
        rest = " ".join(p for p in parts[2:] if p)
        texts.append(", ".join(p for p in (family, " ".join(x for x in (given, rest) if x)) if p))
    main = texts[0] if texts and texts[0] else ""
    other = texts[1].replace(", ", " ") if len(texts) > 1 and texts[1] else ""
    return f"{main} ({other})" if main and other else main or other


def subject(result: ClinicalResult, settings: FhirSettings) -> dict:
    identifier: dict = {"type": {"coding": [{"system": IDENTIFIER_TYPE, "code": "MR"}]}, "value": result.patient_id}
    system = patient_system(result, settings)
    if system:
        identifier["system"] = system
    if result.issuer_of_patient_id:
        identifier["assigner"] = {"display": result.issuer_of_patient_id}
    ref = {"type": "Patient", "identifier": identifier}
    name = _display_name(result.patient_name) if settings.include_patient_data else ""
    if name:
        ref["display"] = name
    return ref


def _based_on(result: ClinicalResult) -> list[dict]:
    if not result.accession_number:
        return []
    identifier: dict = {"type": {"coding": [{"system": IDENTIFIER_TYPE, "code": "ACSN"}]},
                        "value": result.accession_number}
    universal, kind = result.accession_issuer_universal_id, result.accession_issuer_universal_id_type.upper()
    if universal and kind in ("ISO", "URI", "URL"):
        identifier["system"] = f"urn:oid:{universal}" if kind == "ISO" else universal
    if result.accession_issuer:
        identifier["assigner"] = {"display": result.accession_issuer}
    return [{"type": "ServiceRequest", "identifier": identifier}]


def _imaging_study(result: ClinicalResult) -> dict:
    return {"type": "ImagingStudy",
            "identifier": {"system": DICOM_UID, "value": f"urn:oid:{result.study_instance_uid}"}}


def _conditional(resource_type: str, key: str) -> dict:
    return {"method": "PUT", "url": f"{resource_type}?identifier={URI_IDENTIFIER}|{key}"}


def _note(result: ClinicalResult, status: Status, reason: str) -> str:
    text = f"{NOT_FOR_DIAGNOSTIC_USE}. Research software output ({result.model_name} {result.model_version}), " \
           "not verified by a physician."
    if status == "retracted":
        text = f"RESULT WITHDRAWN (entered in error): {reason.strip()}. {text}"
    return text


def _observation(result: ClinicalResult, cls: str, settings: FhirSettings, status: Status, reason: str,
                 issued: str) -> dict:
    finding = result.finding(cls)
    identifiers = [{"use": "official", "system": URI_IDENTIFIER, "value": result_uuid(result, cls)}]
    if finding.tracking_uid:
        identifiers.append(_uid(finding.tracking_uid, "Tracking UID"))
    components = [{"code": PROBABILITY, "valueQuantity": {
        "value": finding.probability, "unit": "probability", "system": SYSTEMS["UCUM"], "code": "1"}}]
    if finding.present and finding.slices:
        components.append({"code": SOURCE_IMAGES, "valueString": slices_text(finding.slices)})
    observation: dict = {
        "resourceType": "Observation",
        "identifier": identifiers,
        "basedOn": _based_on(result),
        "partOf": [_imaging_study(result)],
        "status": REPORT_STATUS[status],
        "category": OBSERVATION_CATEGORY,
        "code": {"coding": [coding(FINDING_CODES[cls])], "text": FINDING_NAMES[cls]},
        "subject": subject(result, settings),
        "effectiveDateTime": _effective(result),
        "issued": issued,
        "valueCodeableConcept": {"coding": [coding(PRESENT if finding.present else ABSENT)]},
        "interpretation": [{"coding": [{"system": INTERPRETATION, "code": "POS", "display": "Positive"}
                                       if finding.present else
                                       {"system": INTERPRETATION, "code": "NEG", "display": "Negative"}]}],
        "note": [{"text": _note(result, status, reason)}],
        "bodySite": {"coding": [coding(FINDING_SITE)]},
        "method": {"text": f"{result.model_name} {result.model_version}: present when the probability reaches "
                           f"{finding.threshold:.4f}"},
        "device": {"display": f"ihd-node {result.model_name} {result.model_version}"},
        "component": components,
    }
    return {key: value for key, value in observation.items() if value not in (None, [], "")}


def _effective(result: ClinicalResult) -> str | None:
    moment = result.study_datetime()
    return _instant(moment) if moment is not None else None


def _conclusion_codes(result: ClinicalResult) -> list[dict]:
    """The present findings a doctor reads (the subtypes; ICH itself only when no subtype is present)."""
    present = result.positive_classes
    shown = [c for c in present if c != "any"] or present
    return [{"coding": [coding(FINDING_CODES[c])], "text": FINDING_NAMES[c]} for c in shown]


def build_bundle(result: ClinicalResult, settings: FhirSettings, *, status: Status, now: dt.datetime,
                 reason: str = "") -> dict:
    """The transaction Bundle of one result (a plain dict; bundle_bytes() serialises it).

    `now` stamps Bundle.timestamp and, for a retraction, `issued`; `reason` is the retraction's reason.
    Raises ValueError when the EHR could not place the report: no patient ID, no retraction reason.
    """
    if status not in REPORT_STATUS:
        raise ValueError(f"unknown result status {status!r}; use preliminary, revised or retracted")
    if not result.patient_id:
        raise ValueError("the study has no Patient ID: the EHR cannot place a report without a subject")
    if status == "retracted" and not reason.strip():
        raise ValueError("a retraction needs a reason")
    issued = _instant(now if status == "retracted" else result.result_datetime)
    key = result_uuid(result)
    conclusion = result.summary.strip()
    if NOT_FOR_DIAGNOSTIC_USE.lower() not in conclusion.lower():
        conclusion += f" {NOT_FOR_DIAGNOSTIC_USE}."
    if status == "retracted":
        conclusion = f"RESULT WITHDRAWN (entered in error): {reason.strip()}. {conclusion}"
    observations = [_observation(result, cls, settings, status, reason, issued) for cls in CLASSES]
    report: dict = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"use": "official", "system": URI_IDENTIFIER, "value": key},
                       _uid(result.sr_sop_instance_uid, "SR SOP Instance UID")],
        "basedOn": _based_on(result),
        "status": REPORT_STATUS[status],
        "category": CATEGORY,
        "code": {"coding": REPORT_CODE, "text": "CT head: AI intracranial hemorrhage triage"},
        "subject": subject(result, settings),
        "effectiveDateTime": _effective(result),
        "issued": issued,
        "imagingStudy": [_imaging_study(result)],
        "result": [{"reference": result_uuid(result, cls), "type": "Observation"} for cls in CLASSES],
        "conclusion": conclusion,
        "conclusionCode": _conclusion_codes(result),
    }
    report = {k: v for k, v in report.items() if v not in (None, [], "")}
    entries = [{"fullUrl": key, "resource": report, "request": _conditional("DiagnosticReport", key)}]
    entries += [{"fullUrl": result_uuid(result, cls), "resource": obs,
                 "request": _conditional("Observation", result_uuid(result, cls))}
                for cls, obs in zip(CLASSES, observations, strict=True)]
    return {"resourceType": "Bundle", "type": "transaction", "timestamp": _instant(now), "entry": entries}


def bundle_bytes(bundle: dict) -> bytes:
    """The bundle as sent: UTF-8 JSON, keys sorted, no spaces (the same result gives the same bytes)."""
    return json.dumps(bundle, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
